"""Train the OmniFlow transformer on pre-encoded latents with Ray Train.

    python -m jobs.train --config configs/train_shapesworld_stage1.yaml [key=value ...]
    python -m jobs.train --resume runs/shapesworld/train/stage1        # continue a stopped run
    ray job submit --working-dir . -- python -m jobs.train --config FILE.yaml scaling.num_workers=8 scaling.use_gpu=true

Each dataset is an encode job's output (or some of its sources) with a share of the samples and a
task distribution; every (dataset, source) pair becomes a Ray Data stream split across the workers,
and each worker mixes its shards into batches (`pipelines.mixing`). A `TorchTrainer` runs
`jobs.train_worker.train_loop` on `scaling.num_workers` workers with DDP or FSDP2 (gloo on CPU,
NCCL on GPU).

Run directory `<storage_path>/<name>/` (local or s3://):
    checkpoint_*/            Ray Train checkpoints: model, EMA, optimizer, step, data positions
    train_config.json        the resolved config (what --resume reads)
    metrics.jsonl            one line per report, also in TensorBoard under tensorboard/ (jobs.train_logs)
    model/                   the final weights (EMA by default) as a model directory
    manifest.json            config and hash, datasets and stream weights, final metrics, timings
A worker failure restarts the group from the last checkpoint (`max_failures`); rerunning a run
(or `--resume`) continues from its last checkpoint.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

from jobs.common import Progress, dumps, job_main
from jobs.train_config import TrainConfig, room_for_data
from jobs.train_logs import TENSORBOARD_DIR, metrics_path
from omniflow import storage as st
from omniflow.codecs.pooled import CLIP_TEXT_KIND
from omniflow.codecs.text_vae import TEXT_VAE_KIND
from omniflow.config import ConfigError, load_config
from pipelines.manifest import TrainManifest, write_manifest
from pipelines.runtime import init_ray, joins_cluster
from pipelines.train_data import LatentDataset, common_latent_shapes, plan_streams

CONFIG_FILE = "train_config.json"


def _run_config(config: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs = st.arrow_filesystem(config.storage_path, config.storage)
    storage_path = st.arrow_path(config.storage_path)
    return RunConfig(
        name=config.name,
        storage_path=storage_path,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
        failure_config=FailureConfig(max_failures=config.max_failures),
    )


def _worker_config(config: TrainConfig) -> dict:
    """The config as workers get it: a local `model.init` made absolute (workers run in another
    working directory)."""
    dumped = config.model_dump(mode="json")
    init = config.model.init
    if init is not None:
        prefix = "sd3:" if init.startswith("sd3:") else ""
        path = init.removeprefix(prefix)
        if st.scheme(path) == "file" and Path(path).exists():
            dumped["model"]["init"] = prefix + str(Path(path).resolve())
    return dumped


def _log_paths(config: TrainConfig) -> tuple[str, str]:
    """(metrics.jsonl, TensorBoard dir) of the run, local paths made absolute (workers run in
    another working directory)."""
    run_dir = st.absolute(config.run_dir)
    return metrics_path(run_dir), st.absolute(config.log.tensorboard_dir or st.join(run_dir, TENSORBOARD_DIR))


def run(config: TrainConfig) -> dict:
    """Train, export the final weights as a model directory, write the manifest; return it."""
    import ray.data
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_worker import train_loop

    progress = Progress("train")
    storage = config.storage
    init_ray(config.ray.num_cpus, log_to_driver=True)
    no_room = room_for_data(config.scaling, ray.cluster_resources().get("CPU", 0.0))
    if no_room and not joins_cluster():
        raise ConfigError(no_room)
    if no_room:
        progress.log(f"warning: {no_room}; training waits until the cluster adds a node")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the per-step log line says what training needs to know
    context.execution_options.preserve_order = True  # a resumed stream re-reads rows in the same order
    progress.phase("reading dataset manifests")
    data = [LatentDataset(spec, storage) for spec in config.datasets]
    shapes = common_latent_shapes(data)
    val_data = next(d for d in data if d.spec.name == (config.validation.dataset or config.datasets[0].name))
    validation_rows = val_data.validation_rows(config.validation.rows, storage)
    plan = plan_streams(config.datasets, data, storage, world=config.scaling.num_workers)
    for name, meta in plan.streams.items():
        progress.log(f"stream {name}: share {meta['weight']:.3f}, tasks {meta['tasks']}")
    codecs = data[0].manifest.codecs
    if config.objective.text_anchor_weight and codecs.get("text", {}).get("kind") != TEXT_VAE_KIND:
        raise ConfigError(f"objective.text_anchor_weight needs latents made with the text VAE ({TEXT_VAE_KIND}); "
                          f"{config.datasets[0].path} used text codec {codecs.get('text', {}).get('kind')!r}")
    pooled = data[0].manifest.pooled
    if config.objective.rules.prefixes_clip and pooled.get("text", {}).get("kind") != CLIP_TEXT_KIND:
        raise ConfigError(f"objective.rules.clip_prefix needs latents whose text pooled encoder is {CLIP_TEXT_KIND} "
                          f"(its hidden states); {config.datasets[0].path} used {pooled.get('text', {}).get('kind')!r}")
    conventions = {"absent": "skip" if config.objective.rules.skip_absent else "noise"}
    if config.objective.rules.prefixes_clip:
        conventions["text_condition"] = "clip_prefix"  # sampled as the release samples what trained so
    st.write_bytes_atomic(st.join(config.run_dir, CONFIG_FILE), dumps(config.model_dump(mode="json")), storage)

    metrics_log, tensorboard_dir = _log_paths(config)
    loop_config = {
        "config": _worker_config(config),
        "streams": plan.streams,
        "latent_shapes": {m: list(s) for m, s in shapes.items()},
        "validation_rows": validation_rows,
        "model_info": {"preset": config.model.preset, "latent_shapes": {m: list(s) for m, s in shapes.items()},
                       "conventions": conventions, "codecs": codecs, "pooled": pooled},
        "tensorboard_dir": tensorboard_dir,
        "metrics_log": metrics_log,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
            resources_per_worker=config.scaling.resources_per_worker,
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=_run_config(config),
        datasets=plan.datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # each worker has datasets of its own
    )
    progress.phase(f"training {config.steps} steps on {config.scaling.num_workers} worker(s)")
    started = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    progress.phase("exporting the final weights")
    model_dir = config.export.path or st.join(config.run_dir, "model")
    _export(result.checkpoint, model_dir, config, storage)
    manifest = write_manifest(config.run_dir, TrainManifest.of(
        config, progress.done(),
        datasets={d.spec.name: {"path": d.spec.path, "rows": d.rows, "source_weights": d.source_weights}
                  for d in data},
        stream_weights={n: m["weight"] for n, m in plan.streams.items()},
        final_metrics=json.loads(dumps(result.metrics)),  # JSON values only
        checkpoint=result.checkpoint.path,
        model_dir=model_dir,
        metrics_log=metrics_log,
        tensorboard_dir=tensorboard_dir,
        train_seconds=round(train_seconds, 1),
    ), storage)
    progress.log(f"done: final loss {result.metrics.get('loss', float('nan')):.4f}, model at {model_dir}")
    return manifest


def _export(checkpoint, model_dir: str, config: TrainConfig, storage: st.StorageConfig) -> None:
    from omniflow.model_dir import export_checkpoint, load_training_checkpoint, publish_model_dir

    with checkpoint.as_directory() as directory:
        state = load_training_checkpoint(directory, optimizer=False)
    if config.ema is None and config.export.use_ema:
        use_ema = False  # nothing else to export
    else:
        use_ema = config.export.use_ema
    if st.scheme(model_dir) == "file":
        export_checkpoint(state, model_dir, use_ema=use_ema, dtype=config.export.dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        export_checkpoint(state, local, use_ema=use_ema, dtype=config.export.dtype)
        publish_model_dir(local, model_dir, storage)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (see configs/train_*.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=2000 scaling.num_workers=4")
    return p


class _StorageOnly(BaseModel):
    """The `storage.*` overrides of `--resume`, validated as the run's config validates them."""

    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)


def _load(args: argparse.Namespace) -> TrainConfig:
    if not args.resume:
        return load_config(TrainConfig, args.config, args.overrides)
    if args.config:
        raise ConfigError("give --config or --resume, not both")
    # an s3:// run directory is read with the storage.* settings given as overrides
    storage = load_config(_StorageOnly, {}, [o for o in args.overrides if o.split("=", 1)[0].split(".")[0] == "storage"]).storage
    saved = st.join(args.resume, CONFIG_FILE)
    if not st.exists(saved, storage):
        raise ConfigError(f"{args.resume} has no {CONFIG_FILE}: not a run directory of this job")
    return load_config(TrainConfig, json.loads(st.read_bytes(saved, storage)), args.overrides)


def main(argv: list[str] | None = None) -> int:
    return job_main(TrainConfig, run, argv, prog="python -m jobs.train", description=__doc__, parser=parser(), load=_load)


if __name__ == "__main__":
    sys.exit(main())
