"""ImageReward against the authors' own code: a tiny random ImageReward in the release's file
layout, scored with their package (`tests/fixtures/image_reward/README.md` says how), loaded and
scored here through `omniflow.scoring.image_reward`."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from omniflow.scoring.image_reward import ImageRewardConfig, load_image_reward

FIXTURE = Path(__file__).parent / "fixtures" / "image_reward"
CASES = json.loads((FIXTURE / "cases.json").read_text())


@pytest.fixture(scope="module")
def reward():
    return load_image_reward(ImageRewardConfig(path=str(FIXTURE), vision_heads=CASES["vision"]["num_heads"]))


def test_tokens_are_the_authors(reward):
    for case in CASES["pairs"]:
        tokens = reward.tokenizer(case["prompt"], padding="max_length", truncation=True, max_length=35)
        assert tokens["input_ids"] == case["input_ids"], case["prompt"]
        assert tokens["attention_mask"] == case["attention_mask"]


def test_rewards_match_the_authors_code(reward):
    """Six prompts with images of six sizes and aspect ratios (resize, crop, truncation), one call
    each as the authors' `score` makes, then all in one batch."""
    images = [Image.open(FIXTURE / case["image"]) for case in CASES["pairs"]]
    prompts = [case["prompt"] for case in CASES["pairs"]]
    expected = torch.tensor([case["reward"] for case in CASES["pairs"]])
    one_by_one = torch.cat([reward.score([p], [im]) for p, im in zip(prompts, images)])
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(reward.score(prompts, images), expected, rtol=0, atol=1e-6)
    assert expected.std() > 0.03  # the cases differ well beyond the tolerance


def test_ranking_case(reward):
    rank = CASES["rank"]
    images = [Image.open(FIXTURE / name) for name in rank["images"]]
    got = reward.score([rank["prompt"]] * len(images), images)
    torch.testing.assert_close(got, torch.tensor(rank["rewards"]), rtol=0, atol=1e-6)


def test_the_wrong_head_count_changes_the_rewards():
    """The vision tower's head count is not in the weights: it is a setting, and it matters."""
    wrong = load_image_reward({"path": str(FIXTURE), "vision_heads": 1})
    case = CASES["pairs"][2]
    got = wrong.score([case["prompt"]], [Image.open(FIXTURE / case["image"])])
    assert abs(got.item() - case["reward"]) > 1e-4


def test_missing_files_are_named(tmp_path):
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="med_config.json does not exist"):
        load_image_reward({"path": str(tmp_path)})
