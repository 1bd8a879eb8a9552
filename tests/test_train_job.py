"""The training job on a real local Ray cluster: DDP on two CPU workers, metrics and TensorBoard,
checkpoints and export, S3 storage (logs included), --resume, validation rows from any part, and
recovery from a killed worker."""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from tensorboardX.proto.event_pb2 import Event
from tiny_clip import write_clip_text_towers

from jobs.train import main, run
from jobs.train_config import TrainConfig
from jobs.train_logs import read_metrics
from omniflow import storage as st
from omniflow.codecs.pooled import CLIP_TEXT_KIND
from omniflow.codecs.text_vae import TEXT_VAE_KIND
from omniflow.codecs.text_vae_train import build_tiny_text_vae
from omniflow.config import ConfigError
from omniflow.initialize import initial_transformer
from omniflow.model_dir import fetch_model_dir, load_model_dir, read_model_info
from omniflow.presets import get_preset
from omniflow.sampling import generate
from pipelines.synthetic_latents import write_latent_dataset

SHAPES = {m.value: s for m, s in get_preset("tiny").latent_shapes().items()}
SOURCES = {"it": (["image", "caption"], 96, 1.0), "at": (["audio", "caption"], 64, 2.0)}


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    write_latent_dataset(out, SHAPES, SOURCES)
    return out


@pytest.fixture(scope="module")
def latents_with_text_encoders(tmp_path_factory) -> Path:
    """The same rows, their manifest naming a tiny text VAE of the text stream's shape (what the
    text anchor decodes with; its captions are the rows' "class 0" ... "class 3") and tiny CLIP
    text towers as the text pooled encoder (what clip_prefix reads: 8 + 8 features, the tiny
    preset's text width, 6 tokens)."""
    out = tmp_path_factory.mktemp("with_text_encoders")
    vae = build_tiny_text_vae([f"class {c}" for c in range(4)], num_queries=SHAPES["text"][0],
                              latent_dim=SHAPES["text"][1], width=32, num_layers=1)
    vae.save_pretrained(out / "text_vae")
    clip = write_clip_text_towers(out / "clip", hidden_size=8, projections=(4, 4))
    write_latent_dataset(out, SHAPES, SOURCES, codecs={"text": {"kind": TEXT_VAE_KIND, "path": str(out / "text_vae")}},
                         pooled={"text": {"kind": CLIP_TEXT_KIND, "path": str(clip), "pooled_dim": 16, "max_length": 6}})
    return out


@pytest.fixture(scope="module")
def latents_by_source(tmp_path_factory) -> Path:
    """An encode output whose parts each hold one source, the audio-text ones first in listing
    order: the first part holds no row of the default validation dataset (images, source "it")."""
    out = tmp_path_factory.mktemp("by_source")
    parts = []
    for source in ("at", "it"):
        manifest = write_latent_dataset(out / source, SHAPES, {source: SOURCES[source]})
        for part in manifest["outputs"]["latents"]:
            parts.append(out / "latents" / f"part-{len(parts)}.parquet")
            parts[-1].parent.mkdir(exist_ok=True)
            os.replace(part, parts[-1])
    manifest["outputs"]["latents"] = [str(p) for p in parts]  # sorted, as the encode job lists them
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _config(latents: Path, storage_path: str, name: str, **extra) -> dict:
    config = {
        "name": name, "storage_path": storage_path, "model": {"preset": "tiny"},
        "datasets": [
            {"name": "images", "path": str(latents), "sources": ["it"], "weight": 2, "tasks": {"t2i": 0.5, "i2t": 0.5}},
            {"name": "sounds", "path": str(latents), "sources": ["at"], "weight": 1, "tasks": {"t2a": 0.6, "a2t": 0.4}},
        ],
        "steps": 20, "batch_size": 8, "seed": 1, "optim": {"lr": 2e-3, "warmup_steps": 2},
        "ema": {"decay": 0.9}, "checkpoint": {"every": 10, "keep": 1}, "log": {"every": 5},
        "validation": {"rows": 16}, "ray": {"num_cpus": 2},
    }
    return {**config, **extra}


def _metrics(run_dir: Path) -> list[dict]:
    return read_metrics(str(run_dir), st.StorageConfig())


def test_ddp_on_two_workers_with_metrics_checkpoints_and_export(tmp_path, latents, ray_cluster):
    """Two workers and three streams, one of them rare: the workers open it at different steps
    (a batch of 8 draws it about once in four), which must not make one wait on the other."""
    config = _config(latents, str(tmp_path), "ddp", scaling={"num_workers": 2, "resources_per_worker": {"CPU": 0.5}})
    config["datasets"].append({"name": "rare", "path": str(latents), "sources": ["it"], "weight": 0.1,
                               "tasks": {"i2t": 1.0}})
    manifest = run(TrainConfig.model_validate(config))
    run_dir = tmp_path / "ddp"
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert metrics[-1]["val/loss"] < metrics[1]["val/loss"]
    assert {"loss/image", "loss/text", "loss/audio", "task/t2i", "task/a2t", "val/loss", "val/loss_t0.5",
            "val/ema_loss", "samples_per_s", "data_wait_share", "grad_norm"} <= set(metrics[-1])
    assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics)
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 1  # keep: 1
    assert manifest["stream_weights"] == pytest.approx({"images.it": 2 / 3.1, "sounds.at": 1 / 3.1, "rare.it": 0.1 / 3.1})

    model = load_model_dir(manifest["model_dir"], dtype=torch.float32, device="cpu")
    assert read_model_info(manifest["model_dir"])["latent_shapes"]["image"] == list(SHAPES["image"])
    out = generate(model, "t2i", conditions={"text": torch.zeros(1, *SHAPES["text"])},
                   target_shapes={"image": SHAPES["image"]}, steps=2)
    assert out["image"].shape == (1, *SHAPES["image"]) and torch.isfinite(out["image"]).all()


def test_grouped_batches_train_one_modality_group_per_step(tmp_path, latents, latents_with_text_encoders,
                                                           ray_cluster):
    """With grouped_batches every step is all image-text or all audio-text samples: a step's log
    holds the image loss or the audio loss, never both, and the mix still reaches both. The run
    also trains with the release's text options: the text anchor (the workers load the text VAE
    the manifest names; steps with text targets log its cross-entropy) and CLIP hidden states
    before half of the t2i / t2a text latents (the workers load the CLIP towers; the model
    directory says to sample so)."""
    release_text = {"rules": {"skip_absent": True, "clip_prefix": {"t2i": 0.5, "t2a": 0.5}}, "text_anchor_weight": 0.1}
    config = TrainConfig.model_validate(_config(
        latents_with_text_encoders, str(tmp_path), "grouped", steps=12, log={"every": 1}, ema=None,
        objective=release_text, grouped_batches=True))
    manifest = run(config)
    metrics = _metrics(tmp_path / "grouped")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    groups = [("loss/image" in m, "loss/audio" in m) for m in metrics]
    assert set(groups) == {(True, False), (False, True)}
    assert read_model_info(manifest["model_dir"])["conventions"] == {"absent": "skip", "text_condition": "clip_prefix"}
    text_steps = [m for m in metrics if "loss/text" in m]
    assert text_steps and all(math.isfinite(m["loss/text_ce"]) and m["loss/text_ce"] > 0 for m in text_steps)
    assert all("loss/text_ce" not in m for m in metrics if "loss/text" not in m)
    with pytest.raises(ValueError, match="grouped_batches needs objective.rules.skip_absent"):
        TrainConfig.model_validate(_config(latents, str(tmp_path), "bad", grouped_batches=True))
    without_vae = TrainConfig.model_validate(_config(latents, str(tmp_path), "no_vae", objective={"text_anchor_weight": 1}))
    with pytest.raises(ConfigError, match="text_anchor_weight needs latents made with the text VAE"):
        run(without_vae)
    without_clip = TrainConfig.model_validate(_config(latents, str(tmp_path), "no_clip",
                                                      objective={"rules": {"clip_prefix": {"t2i": 0.5}}}))
    with pytest.raises(ConfigError, match="clip_prefix needs latents whose text pooled encoder is clip-text-pooled"):
        run(without_clip)


def _scalars(event_file: bytes, tag: str) -> dict[int, float]:
    """step -> value of `tag` in a TensorBoard event file (TFRecord framing: length, its CRC, the
    record, its CRC)."""
    out, at = {}, 0
    while at < len(event_file):
        (length,) = struct.unpack("<Q", event_file[at:at + 8])
        event = Event.FromString(event_file[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            if value.tag == tag:
                out[event.step] = value.simple_value
    return out


def test_fsdp_with_s3_storage_resume_and_logs(s3_server, latents, ray_cluster):
    """FSDP2 on two workers writes sharded checkpoints (a shard per worker, nothing gathered) to
    the s3:// run directory, with metrics.jsonl and TensorBoard events; the run resumes on one
    worker (the shards resharded as they load), appends to the lines already there and adds its
    own event file beside the first one."""
    storage = s3_server.storage.model_dump()
    bucket = s3_server.new_bucket()
    config = _config(latents, f"s3://{bucket}/train", "s3run", storage=storage, steps=10, parallel={"strategy": "fsdp"},
                     log={"every": 5, "tensorboard_dir": None},
                     scaling={"num_workers": 2, "resources_per_worker": {"CPU": 0.5}})
    run(TrainConfig.model_validate(config))
    run_dir = f"s3://{bucket}/train/s3run"
    assert [m["step"] for m in read_metrics(run_dir, s3_server.storage)] == [5, 10]
    shards = [p.rsplit("/", 1)[1] for p in st.list_files(f"{run_dir}/checkpoint_*/sharded/*", s3_server.storage)]
    assert sorted(shards) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not st.list_files(f"{run_dir}/checkpoint_*/model.safetensors", s3_server.storage)
    # The sharded checkpoint, gathered whole on one process (as model.init and merges read it), holds
    # the EMA weights the run exported.
    checkpoint = st.list_files(f"{run_dir}/checkpoint_*", s3_server.storage)[0]
    exported = load_model_dir(fetch_model_dir(f"{run_dir}/model", s3_server.storage), dtype=torch.float32, device="cpu")
    torch.testing.assert_close(initial_transformer(checkpoint, storage=s3_server.storage).state_dict(),
                               exported.state_dict())
    endpoint = f"storage.endpoint_url={s3_server.endpoint_url}"
    assert main(["--resume", run_dir, endpoint, "steps=15", "scaling.num_workers=1"]) == 0

    manifest = json.loads(st.read_bytes(f"{run_dir}/manifest.json", s3_server.storage))
    assert manifest["final_metrics"]["step"] == 15
    assert st.exists(f"{run_dir}/model/model_index.json", s3_server.storage)
    metrics = read_metrics(run_dir, s3_server.storage)
    assert [m["step"] for m in metrics] == [5, 10, 15]
    assert metrics[-1]["loss"] == pytest.approx(manifest["final_metrics"]["loss"])
    events = st.list_files(f"{run_dir}/tensorboard", s3_server.storage)
    assert len(events) == 2 and all(e.rsplit("/", 1)[1].startswith("events.out.tfevents") for e in events)
    losses = {}
    for e in events:
        losses.update(_scalars(st.read_bytes(e, s3_server.storage), "loss"))
    assert losses == pytest.approx({m["step"]: m["loss"] for m in metrics})


def test_validation_rows_found_in_any_part(tmp_path, latents_by_source, ray_cluster):
    first = min((latents_by_source / "latents").iterdir())
    assert "it" not in set(pq.read_table(first, columns=["source"]).column("source").to_pylist())
    config = _config(latents_by_source, str(tmp_path), "by_source", steps=4, checkpoint={"every": 4, "keep": 1},
                     log={"every": 2}, validation={"rows": 16})
    run(TrainConfig.model_validate(config))
    metrics = _metrics(tmp_path / "by_source")
    assert [m["step"] for m in metrics] == [2, 4]
    assert metrics[-1]["val/loss"] > 0 and "val/ema_loss" in metrics[-1]


def test_validation_batches_of_an_empty_table_are_none(latents):
    from pipelines.train_data import validation_batches

    config = TrainConfig.model_validate(_config(latents, "unused", "empty"))
    empty = pq.read_table(min((latents / "latents").iterdir())).slice(0, 0)
    assert validation_batches(empty, config.datasets[0], seed=0, device=torch.device("cpu")) == []


def test_validation_dataset_without_usable_rows_is_a_config_error(tmp_path, latents_by_source, ray_cluster, capsys):
    config = _config(latents_by_source, str(tmp_path), "unusable", validation={"dataset": "sounds"})
    config["datasets"][1]["tasks"] = {"t2i": 1.0}  # its source holds audio and captions, no image
    path = tmp_path / "unusable.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "validation.dataset 'sounds'" in err and "['at']" in err and "['t2i']" in err
    assert not (tmp_path / "unusable").exists()  # refused before the run started


def test_workers_that_leave_no_cpu_for_data_are_refused(tmp_path, latents, ray_cluster, capsys):
    """On a local cluster that cannot grow, two workers taking both CPUs would leave Ray Data's
    read tasks waiting forever: the job says so and how to fix it, before the run starts."""
    path = tmp_path / "crowded.json"
    path.write_text(json.dumps(_config(latents, str(tmp_path), "crowded", scaling={"num_workers": 2})))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "reserve 2 of the cluster's 2 CPUs" in err and "scaling.resources_per_worker" in err
    assert not (tmp_path / "crowded").exists()


def _train_workers(root: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path, latents):
    """SIGKILL the training worker once a checkpoint is registered: Ray Train restarts it from that
    checkpoint, the steps continue from there, and the result matches an uninterrupted run."""
    steps = 60
    config = _config(latents, str(tmp_path), "faulty", steps=steps, max_failures=1, log={"every": 5})
    path = tmp_path / "faulty.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "faulty"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once Ray Train registers a checkpoint
    deadline = time.time() + 300
    while time.time() < deadline and not snapshot.exists():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    workers = _train_workers(proc.pid)
    assert workers, "no training worker found"
    killed_at = _metrics(run_dir)[-1]["step"]
    for w in workers:
        w.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-5000:]
    assert "RETRY" in output  # Ray Train's failure policy restarted the worker group

    steps_logged = [m["step"] for m in _metrics(run_dir)]
    restart = next(i for i in range(1, len(steps_logged)) if steps_logged[i] <= steps_logged[i - 1])
    # the restart continues after a checkpoint (every 10 steps), not from step 0
    assert steps_logged[restart] % 10 == 5 and 10 <= steps_logged[restart] - 5 <= killed_at
    assert sorted(set(steps_logged)) == list(range(5, steps + 1, 5))

    clean = run(TrainConfig.model_validate(_config(latents, str(tmp_path), "clean", steps=steps)))
    faulty = _metrics(run_dir)[-1]
    assert faulty["val/loss"] == pytest.approx(clean["final_metrics"]["val/loss"], rel=0.05)
