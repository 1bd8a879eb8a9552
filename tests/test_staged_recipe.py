"""The paper's staged recipe on ShapesWorld latents, end to end on a local Ray cluster:
curate pair datasets -> synthesize triplets -> encode with the toy codecs -> stage 1 (image-text)
and stage 2 (text-audio) training -> merge -> stage 3 any-to-any fine-tuning -> sampling."""

from pathlib import Path

import pytest
import torch
import yaml

from jobs.common import load_config
from omniflow.merge import stream_of
from omniflow.model_dir import load_model_dir
from omniflow.sampling import generate
from omniflow.tasks import BUILTIN_TASKS


def _yaml(name: str) -> dict:
    return yaml.safe_load(Path("configs", name).read_text())


@pytest.fixture(scope="module")
def latents(tmp_path_factory, toy_codecs, ray_cluster) -> Path:
    from jobs import curate, encode, synthesize

    root = tmp_path_factory.mktemp("shapes")
    config = _yaml("curate_shapesworld.yaml")
    config.pop("clip")  # CLIP scoring is covered elsewhere; the recipe needs the rows
    for source, samples in zip(config["sources"], (96, 96, 32)):
        source.update(samples=samples, samples_per_shard=32)
        source["filters"] = {"min_caption_chars": 3} if "caption" in source["modalities"] else {}
    curate.run(curate.CurateConfig.model_validate({**config, "output": str(root / "curated")}))
    synthesize.run(load_config(synthesize.SynthesizeConfig, "configs/synthesize_shapesworld.yaml",
                               [f"input={root / 'curated'}", f"output={root / 'triplets'}"]))
    codecs_dir, _ = toy_codecs
    encode.run(load_config(encode.EncodeConfig, "configs/encode_shapesworld.yaml",
                           [f"input={root / 'triplets'}", f"output={root / 'latents'}", f"toy_codecs={codecs_dir}"]))
    return root


def _train(name: str, root: Path, **overrides):
    from jobs.train import run
    from jobs.train_config import TrainConfig

    config = _yaml(name)
    for dataset in config["datasets"]:
        dataset["path"] = str(root / "latents")
    config.update(storage_path=str(root / "train"), steps=12, batch_size=16,
                  checkpoint={"every": 12}, log={"every": 6}, validation={"rows": 16}, **overrides)
    return run(TrainConfig.model_validate(config))


def test_train_merge_finetune_and_sample(latents):
    from jobs import merge

    stage1 = _train("train_shapesworld_stage1.yaml", latents)
    stage2 = _train("train_shapesworld_stage2.yaml", latents)
    merged = latents / "merged"
    assert merge.main(["--config", "configs/merge_shapesworld.yaml", f"output={merged}",
                       f"recipe.image_model={stage1['model_dir']}", f"recipe.audio_model={stage2['model_dir']}"]) == 0
    one, two, both = (load_model_dir(p, dtype=torch.float32, device="cpu")
                      for p in (stage1["model_dir"], stage2["model_dir"], merged))
    assert set(one.streams) == {"image", "text"} and set(two.streams) == {"text", "audio"}
    assert set(both.streams) == {"image", "text", "audio"}
    s1, s2, sm = one.state_dict(), two.state_dict(), both.state_dict()
    for name, value in sm.items():
        expected = {"image": lambda: s1[name], "audio": lambda: s2[name],
                    "text": lambda: (s1[name] + s2[name]) / 2}[stream_of(name)]()
        torch.testing.assert_close(value, expected, msg=name)

    stage3 = _train("train_shapesworld_stage3.yaml", latents, model={"init": str(merged)})
    final = stage3["final_metrics"]
    assert {"task/t2i", "task/a2t"} <= set(final) and torch.isfinite(torch.tensor(final["val/loss"]))
    model = load_model_dir(stage3["model_dir"], dtype=torch.float32, device="cpu")
    shapes = {m: tuple(s) for m, s in stage3_shapes(stage3).items()}
    for task in ("t2i", "i2t", "t2a", "a2t", "i2a", "a2i", "at2i"):
        t = BUILTIN_TASKS[task]
        conditions = {m.value: torch.randn(2, *shapes[m.value]) for m in t.conditions}
        out = generate(model, task, conditions=conditions, target_shapes={m.value: shapes[m.value] for m in t.targets},
                       steps=2, generator=torch.Generator().manual_seed(0))
        for m in t.targets:
            assert out[m].shape == (2, *shapes[m.value]) and torch.isfinite(out[m]).all()


def stage3_shapes(manifest: dict) -> dict:
    from omniflow.model_dir import read_model_info

    return read_model_info(manifest["model_dir"])["latent_shapes"]
