"""The whole flow at a small scale, as `make demo` runs it: curate -> synthesize -> encode ->
stage 1 (image-text) and stage 2 (text-audio) training -> merge -> stage 3 any-to-any fine-tuning
-> serve and query every task over HTTP -> quality -> report; then a rerun that reuses every stage."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from omniflow.merge import stream_of
from omniflow.modality import Modality
from omniflow.model_dir import load_model_dir
from omniflow.storage import StorageConfig
from omniflow.tasks import BUILTIN_TASKS
from pipelines.manifest import CurateManifest, write_manifest
from shapesworld.checkers import concept_accuracy
from shapesworld.concepts import Concept
from shapesworld.defects import make_records
from shapesworld.demo import Demo, DemoConfig, run, toy_fingerprint
from shapesworld.quality import EVAL_TASKS, read_concepts

STAGES = ["curate", "synthesize", "encode", "train stage1", "train stage2", "merge", "train stage3", "evaluate"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, toy_dir, toy_codecs, toy_clip, ray_cluster) -> tuple[DemoConfig, dict]:
    config = DemoConfig.model_validate({
        "out": str(tmp_path_factory.mktemp("demo")), "toy": str(toy_dir), "data_scale": 0.05,
        "steps": {"stage1": 8, "stage2": 8, "stage3": 12}, "batch_size": 16,
        "train_overrides": ["log.every=4", "checkpoint.every=100", "validation.rows=16"],
        "quality": {"samples": 10, "steps": 3, "batch_size": 10}, "serve_samples": 1, "serve_steps": 3,
        # four of the six tasks, each costing seconds of actor start-up: i2t runs in
        # tests/test_evaluate_job.py, and a2i goes the ways of t2i (an image target) and i2a (a
        # medium condition)
        "evaluation_samples": 4, "evaluation_overrides": ["sampling.steps=3", "benchmarks.0.tasks=[t2i]",
                                                          "benchmarks.2.tasks=[i2a]"],
    })
    return config, run(config)


def test_every_stage_runs_and_metrics_hold_every_task(demo):
    config, metrics = demo
    out = Path(config.out)
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["reused_stages"] == [] and set(STAGES) <= set(metrics["stage_seconds"])
    assert list(metrics["quality"]["tasks"]) == list(EVAL_TASKS)
    for task, result in metrics["quality"]["tasks"].items():
        assert result["samples"] == 10
        assert all(0.0 <= result[k] <= 1.0 for k in ("colour", "shape", "both", "unknown")), task
        assert result["both"] <= min(result["colour"], result["shape"])
    goal = metrics["quality"]["config"]["goal"]
    assert metrics["quality"]["below_goal"] == [t for t, r in metrics["quality"]["tasks"].items() if r["both"] < goal]
    assert {"shapes-image-text", "shapes-audio-text", "shapes-image-audio"} == set(metrics["curation"])
    assert all(c["rejected"] > 0 for c in metrics["curation"].values())  # the planted defects
    assert Path(metrics["model_dir"]) == out / "model"  # where serve/config.yaml looks (under runs/demo)
    assert (out / "model" / "model_index.json").is_file() and (out / "model" / "image_codec").is_dir()
    final = metrics["training"]["stage3"]
    assert {"task/t2i", "task/a2t"} <= set(final) and torch.isfinite(torch.tensor(final["val/loss"]))
    evaluation = metrics["evaluation"]["benchmarks"]
    assert {t for tasks in evaluation.values() for t in tasks} == {"t2i", "t2a", "a2t", "i2a"}
    assert all(r["samples"] == 4 for tasks in evaluation.values() for r in tasks.values())
    assert {(r["task"], r["metric"]) for r in metrics["evaluation"]["beside_paper"]} >= {("t2i", "fid"), ("t2a", "fad")}
    audio = evaluation["shapes-audio-text"]
    assert audio["t2a"]["fad"] >= 0 and 0 <= audio["t2a"]["clap_score"] <= 100 and 0 <= audio["a2t"]["clap_score"] <= 100
    assert 0 <= evaluation["shapes-image-audio"]["i2a"]["checks_all"] <= 1


def test_the_merged_model_is_its_definition(demo):
    config, _metrics = demo
    train = Path(config.out) / "train"
    one, two, both = (load_model_dir(p, dtype=torch.float32) for p in
                      (train / "stage1" / "model", train / "stage2" / "model", Path(config.out) / "merge" / "model"))
    assert set(one.streams) == {"image", "text"} and set(two.streams) == {"text", "audio"}
    assert set(both.streams) == {"image", "text", "audio"}
    s1, s2, sm = one.state_dict(), two.state_dict(), both.state_dict()
    for name, value in sm.items():
        expected = {"image": s1.get, "audio": s2.get,
                    "text": lambda n: (s1[n] + s2[n]) / 2}[stream_of(name)](name)
        torch.testing.assert_close(value, expected, msg=name)


def test_service_answered_every_task_and_the_report_shows_it(demo):
    config, metrics = demo
    out = Path(config.out)
    answers = metrics["serving"]["tasks"]
    assert set(answers) == set(BUILTIN_TASKS)
    for task, answer in answers.items():
        suffixes = {Path(f).suffix for f in answer["files"]}
        expected = {{"image": ".png", "audio": ".wav", "text": ".txt"}[m.value] for m in BUILTIN_TASKS[task].targets}
        assert suffixes == expected and all((out / f).is_file() for f in answer["files"]), task
    report = (out / "report.html").read_text()
    assert report.count("<audio controls") >= 1 + sum(".wav" in f for a in answers.values() for f in a["files"])
    assert all(f"<h3>{task}</h3>" in report for task in BUILTIN_TASKS)
    assert "<h2>Evaluation</h2>" in report and "Beside the paper" in report
    files = [f for a in answers.values() for f in a["files"]]
    wavs, pngs = sum(f.endswith(".wav") for f in files), sum(f.endswith(".png") for f in files)
    # every generated image, a spectrogram per clip, the input image, a loss plot per stage
    assert report.count("data:image/png;base64") >= pngs + wavs + 1 + 3


def test_rerun_reuses_every_stage(demo):
    config, _ = demo
    again = run(config)
    assert again["reused_stages"] == STAGES
    assert not set(STAGES) & set(again["stage_seconds"])


def test_checkers_read_ground_truth_media_as_their_concepts():
    """The quality measurement itself: real ShapesWorld media read back as their concepts."""
    records = make_records(30, seed=5)
    truth = [Concept(r["colour"], r["shape"]) for r in records]
    for modality, field in ((Modality.IMAGE, "image"), (Modality.AUDIO, "audio"), (Modality.TEXT, "caption")):
        accuracy = concept_accuracy(read_concepts(modality, [r[field] for r in records]), truth)
        assert accuracy["both"] == 1.0, modality


class _Step(BaseModel):
    value: int


def test_a_stage_is_redone_when_anything_before_it_was(tmp_path):
    """Reuse follows the chain: a stage whose config is unchanged still runs again, from an empty
    output directory, when a stage before it ran again or the toy models were rebuilt; a changed
    config with the same inputs runs into the same directory (the job resumes what it can)."""
    ran: list[str] = []

    def flow(toy: str, value: int = 1) -> list[str]:
        demo = Demo(DemoConfig(out=str(tmp_path)))
        demo.upstream = toy
        for name in ("first", "second", "third"):
            config = _Step(value=value if name == "third" else 1)

            def job(config, name=name):
                ran.append(name)
                (tmp_path / name / "kept").parent.mkdir(exist_ok=True)
                (tmp_path / name / "kept").touch()  # what a resumed job would find
                manifest = CurateManifest.of(config, {}, inputs={}, run_id=name, counts={}, source_weights={},
                                             outputs={"curated": [], "rejects": None})
                return write_manifest(str(tmp_path / name), manifest, StorageConfig())
            demo.stage(name, config, str(tmp_path / name), job)
        return demo.reused

    assert flow("toy-a") == [] and ran == ["first", "second", "third"]
    ran.clear()
    assert flow("toy-a") == ["first", "second", "third"] and ran == []
    (tmp_path / "third" / "resumable").touch()
    assert flow("toy-a", value=2) == ["first", "second"] and ran == ["third"]  # e.g. more steps
    assert (tmp_path / "third" / "resumable").is_file()
    ran.clear()
    (tmp_path / "second" / "manifest.json").unlink()  # the second stage runs again: so must the third
    assert flow("toy-a", value=2) == ["first"] and ran == ["second", "third"]
    assert not (tmp_path / "third" / "resumable").exists()  # made from the old second stage's output
    ran.clear()
    assert flow("toy-b", value=2) == [] and ran == ["first", "second", "third"]  # rebuilt toy models


def test_toy_fingerprint_changes_with_a_rebuild(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "codecs").mkdir()
    (tmp_path / "clip" / "clip.json").write_text('{"config_hash": "a", "seconds": 1}')
    (tmp_path / "codecs" / "codecs.json").write_text('{"config_hash": "b", "seconds": 2}')
    before = toy_fingerprint(tmp_path)
    assert toy_fingerprint(tmp_path) == before
    (tmp_path / "codecs" / "codecs.json").write_text('{"config_hash": "b", "seconds": 3}')  # same config, rebuilt
    assert toy_fingerprint(tmp_path) != before
