"""The evaluation job end to end on a real local Ray cluster: a toy model, ShapesWorld benchmark
sets and a caption set with several captions per image, the toy feature extractors and a tiny
ImageReward, inputs and outputs on a loopback S3 bucket; resuming, reproducible seeds, cached
reference statistics, and rows that cannot be evaluated. (`tests/test_demo.py` runs the
ShapesWorld config on every task, audio metrics included.)"""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.evaluate import main
from omniflow import storage as st
from omniflow.metrics import caption_metrics
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.generate import sample_seed, start_rows
from pipelines.schema import EVAL_SCORE, READ_SAMPLE

SAMPLES = 6
IMAGE_REWARD = Path(__file__).parent / "fixtures" / "image_reward"
# three images, each in two or three rows with its own caption (COCO's layout, five per image)
CAPTIONED = [(0, "a red circle"), (0, "a small red circle"), (1, "a blue square"), (1, "a blue box"),
             (1, "one blue square"), (2, "a green triangle"), (2, "a triangle in green")]


def _source(name: str, modalities: list[str], seed: int) -> dict:
    return {"name": name, "type": "shapesworld", "modalities": modalities, "samples": SAMPLES,
            "samples_per_shard": 3, "seed": seed}


def _captioned_set(s3_server) -> str:
    """A Parquet benchmark on S3 with several rows per image, and one row without its image."""
    import numpy as np

    from omniflow.codecs.media import encode_image

    rng = np.random.default_rng(5)
    images = [encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    rows = [{"image": images[i], "caption": c} for i, c in CAPTIONED] + [{"image": None, "caption": "lost"}]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    url = s3_server.url("evaluation", "benchmarks", "captioned", "part-0.parquet")
    st.write_bytes_atomic(url, buffer.getvalue(), s3_server.storage)
    return url


@pytest.fixture(scope="module")
def config(toy_model_dir, toy_clip, s3_server) -> dict:
    clip_dir, _ = toy_clip
    image_reward = s3_server.url("evaluation", "models", "image_reward")
    st.upload_dir(IMAGE_REWARD, image_reward, s3_server.storage)
    return {
        "model": str(toy_model_dir),
        "output": s3_server.url("evaluation", "run"),
        "storage": s3_server.storage.model_dump(mode="json"),
        "benchmarks": [
            {"name": "image-text", "source": _source("eval-it", ["image", "caption"], 1_000_003), "tasks": ["t2i"],
             "paper": "coco"},
            # no audio in this set: every t2a row is rejected with its reason
            {"name": "image-only", "source": _source("eval-i", ["image", "caption"], 1_000_005), "tasks": ["t2a"]},
            {"name": "captioned", "source": {"name": "captioned", "type": "parquet", "path": _captioned_set(s3_server)},
             "tasks": ["i2t"], "paper": "coco"},
        ],
        "sampling": {"steps": 2, "guidance": 2.0, "seed": 3},
        "metrics": {
            "clip": {"model_name": "shapesworld-clip", "config_file": str(clip_dir / "shapesworld-clip.json"),
                     "pretrained": str(clip_dir / "open_clip_model.safetensors")},
            "image_features": "clip", "audio_tower": str(clip_dir), "audio_features": "audio_tower",
            "audio_text": "audio_tower", "checkers": "shapesworld",
            "image_reward": {"path": image_reward, "vision_heads": 3},
            "reference_cache": s3_server.url("evaluation", "reference"),
        },
        "generation": {"batch_size": 4}, "scoring": {"batch_size": 4}, "rows_per_part": 2,
        "report_samples": 2, "ray": {"num_cpus": 2},
    }


def _read(path: str, storage: dict) -> bytes:
    return st.read_bytes(path, st.StorageConfig.model_validate(storage))


def test_evaluate_end_to_end_resumes_and_reproduces(config, ray_cluster, tmp_path, capsys):
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path)]) == 0
    storage, run = config["storage"], config["output"]
    metrics = json.loads(_read(f"{run}/metrics.json", storage))
    it = metrics["benchmarks"]["image-text"]  # (audio metrics: tests/test_demo.py runs the toy's config)
    captioned = metrics["benchmarks"]["captioned"]["i2t"]
    assert it["t2i"]["samples"] == SAMPLES
    assert it["t2i"]["fid"] >= 0 and it["t2i"]["reference_samples"] == SAMPLES
    assert 0 <= it["t2i"]["clip_score"] <= 100 and 0 <= captioned["clip_score"] <= 100
    assert {"cider", "bleu4", "rouge_l", "clip_score", "checks_colour", "checks_shape", "checks_all"} <= set(captioned)
    paper = {(r["task"], r["metric"]): r for r in metrics["beside_paper"]}
    assert set(paper) == {("t2i", "fid"), ("t2i", "clip_score"), ("i2t", "clip_score"), ("i2t", "cider")}
    assert paper[("i2t", "cider")]["this_run"] == pytest.approx(100 * captioned["cider"])
    assert paper[("t2i", "fid")]["omniflow_paper"] == 13.40
    assert metrics["benchmarks"]["image-only"]["t2a"] == {"samples": 0, "rejected": SAMPLES}
    scores = pq.read_table(io.BytesIO(_read(f"{run}/image-text/t2i/scores.parquet", storage)))
    assert scores.schema.equals(EVAL_SCORE, check_metadata=False) and scores.num_rows == SAMPLES
    rewards = scores.column("image_reward").to_pylist()
    assert None not in rewards and len(set(rewards)) > 1
    assert it["t2i"]["image_reward"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)

    # Several captions of one image: one sample, captioned once, scored against all of them.
    assert captioned["samples"] == 3 and captioned["rejected"] == 1
    assert captioned["references_per_sample"] == pytest.approx(len(CAPTIONED) / 3)
    generated = {r["caption"]: r["generated_caption"]
                 for r in _samples(f"{run}/captioned/i2t/samples", storage).values()}
    assert set(generated) == {"a red circle", "a blue square", "a green triangle"}  # each image's first row
    references = [[c for i, c in CAPTIONED if i == image] for image in range(3)]
    expected = caption_metrics([generated[refs[0]] for refs in references], references)
    assert captioned["cider"] == pytest.approx(expected.cider, abs=1e-6)
    report = _read(f"{run}/report.html", storage).decode()
    assert "best by clip_score" in report and "data:image/png;base64," in report and "Beside the paper" in report

    # Resuming with another sampler setting would mix two runs' samples: refused.
    capsys.readouterr()
    assert main(["--config", str(path), "sampling.steps=3"]) == 2
    assert "holds samples made with another sampling" in capsys.readouterr().err

    # A lost part: its rows are generated again, to the same bytes (each sample has its own seed);
    # what is unchanged is reused: the other tasks' samples and scores, the reference statistics.
    first_t2i = _samples(f"{run}/image-text/t2i/samples", storage)
    st.remove(first_t2i[min(first_t2i)]["part"], st.StorageConfig.model_validate(storage))
    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "image-text/t2i: resuming," in out and "captioned/i2t: every row was generated earlier" in out
    assert "captioned/i2t: scores of these samples from" in out
    assert f"reference statistics from {config['metrics']['reference_cache']}" in out
    regenerated = _samples(f"{run}/image-text/t2i/samples", storage)
    assert {k: v["generated_image"] for k, v in regenerated.items()} == \
        {k: v["generated_image"] for k, v in first_t2i.items()}
    again = json.loads(_read(f"{run}/metrics.json", storage))["benchmarks"]
    for bench, tasks in metrics["benchmarks"].items():
        for task, result in tasks.items():
            assert again[bench][task] == pytest.approx(result, rel=1e-5), (bench, task)  # float32 sums, reordered


def _samples(directory: str, storage: dict) -> dict[str, dict]:
    config = st.StorageConfig.model_validate(storage)
    out = {}
    for part in st.list_files(directory, config):
        for row in pq.read_table(io.BytesIO(st.read_bytes(part, config))).to_pylist():
            out[row["key"]] = {**row, "part": part}
    return out


def test_rows_get_their_seed_and_reasons():
    table = start_rows(pa.Table.from_pylist([
        {"key": "s/part-0/0", "source": "s", "shard": "part-0", "sample_id": "0", "image": b"x", "caption": "red"},
        {"key": "s/part-0/1", "source": "s", "shard": "part-0", "sample_id": "1", "caption": "blue"},
        {"key": "s/part-0/2", "source": "s", "shard": "part-0", "sample_id": "2", "image": b"x", "caption": " "},
    ], schema=READ_SAMPLE), task="i2t", base_seed=7)
    assert table.column("seed").to_pylist() == [sample_seed(7, "i2t", f"s/part-0/{i}") for i in range(3)]
    assert table.column("reject_reason").to_pylist() == [None, "no image (the condition of i2t)",
                                                         "no caption (the reference of i2t)"]


def test_config_errors_name_the_field():
    base = {"model": "runs/model", "output": "out",
            "benchmarks": [{"name": "b", "source": _source("s", ["image", "caption"], 0), "tasks": ["t2i"]}]}
    with pytest.raises(ValueError, match="image_features 'inception' needs inception_weights"):
        EvaluateConfig.model_validate(base)
    with pytest.raises(ValueError, match="evaluation takes tasks with one target"):
        EvaluateConfig.model_validate({**base, "metrics": {"image_features": None, "audio_features": None,
                                                           "audio_text": None},
                                       "benchmarks": [{**base["benchmarks"][0], "tasks": ["joint"]}]})


def test_inception_features_of_mixed_sizes_from_weights_on_s3(s3_server, tmp_path):
    """`image_features: inception` reads its weights file from S3 and turns images of any size into
    pool features (the FID network's layout: a randomly initialised torchvision InceptionV3)."""
    import numpy as np
    import torch
    import torchvision

    from omniflow.codecs.media import encode_image
    from pipelines.evaluation.config import MetricsConfig
    from pipelines.evaluation.scoring import Embedders

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    url = s3_server.url("weights", "inception.pth")
    st.write_bytes_atomic(url, (tmp_path / "inception.pth").read_bytes(), s3_server.storage)
    metrics = MetricsConfig(inception_weights=url, audio_features=None, audio_text=None)
    embedders = Embedders(metrics, device=torch.device("cpu"), storage=s3_server.storage)
    rng = np.random.default_rng(0)
    images = [encode_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (300, 200))]
    features = embedders.image_features(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])


def test_the_paper_config_validates():
    """configs/evaluate_paper.yaml (docs/evaluate.md's real-benchmark path) as the job loads it."""
    from omniflow.config import load_config

    config = load_config(EvaluateConfig, "configs/evaluate_paper.yaml", ["model=s3://bucket/model"])
    assert [(b.paper, b.tasks) for b in config.benchmarks] == [
        ("coco", ["t2i"]), ("coco", ["i2t"]), ("audiocaps", ["t2a"]), ("audiocaps", ["a2t"])]
    assert config.metrics.image_features == "inception" and config.metrics.image_reward is not None
