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
    metrics.jsonl            one line per report (local runs), also in TensorBoard under tensorboard/
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
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import (
    ConfigError,
    Progress,
    config_hash,
    dumps,
    init_ray,
    job_main,
    load_config,
    package_versions,
    parse_overrides,
)
from jobs.train_config import TrainConfig
from pipelines import storage as st
from pipelines.mixing import DatasetSpec, stream_weights
from pipelines.schema import LATENT_MODALITIES, latent_column
from pipelines.writer import read_parts

if TYPE_CHECKING:
    import ray.data

CONFIG_FILE, MANIFEST = "train_config.json", "manifest.json"


class LatentDataset:
    """What training needs to know about one dataset's latent shards, read on the driver."""

    def __init__(self, spec: DatasetSpec, storage: st.StorageConfig):
        path = st.join(spec.path, MANIFEST)
        if not st.exists(path, storage):
            raise ValueError(f"dataset {spec.name!r}: {path} not found; point `path` at an encode job's output")
        manifest = json.loads(st.read_bytes(path, storage))
        if manifest.get("job") != "encode":
            raise ValueError(f"dataset {spec.name!r}: {path} is a {manifest.get('job')!r} manifest, not an encode one")
        self.spec, self.manifest = spec, manifest
        self.parts = manifest["outputs"]["latents"]
        shapes = manifest["latents"]["shapes"]
        self.latent_shapes = {m: tuple(shapes[latent_column(m)]) for m in LATENT_MODALITIES if latent_column(m) in shapes}
        self.parts_of: dict[str, list[str]] = {}  # source -> the parts holding its rows
        rows: dict[str, int] = {}
        weight_sums: dict[str, float] = {}
        for part in self.parts:
            table = read_parts([part], storage, columns=["source", "source_weight"])
            sources = table.column("source").to_numpy(zero_copy_only=False)
            weights = table.column("source_weight").to_numpy(zero_copy_only=False)
            for s in set(sources):
                self.parts_of.setdefault(s, []).append(part)
                rows[s] = rows.get(s, 0) + int((sources == s).sum())
                weight_sums[s] = weight_sums.get(s, 0.0) + float(weights[sources == s].sum())
        self.rows = {s: rows[s] for s in sorted(rows)}
        self.source_weights = {s: weight_sums[s] / rows[s] for s in self.rows}
        if spec.sources is not None:
            missing = sorted(set(spec.sources) - set(self.rows))
            if missing:
                raise ValueError(f"dataset {spec.name!r}: sources {missing} have no rows in {spec.path} (it has {sorted(self.rows)})")
            self.rows = {s: self.rows[s] for s in spec.sources}
            self.source_weights = {s: self.source_weights[s] for s in spec.sources}

    def ray_datasets(self, storage: st.StorageConfig) -> dict[str, "ray.data.Dataset"]:
        """One Ray dataset per source, named `<dataset>.<source>`: each reads only the parts that hold
        its source, and the source predicate is pushed into the Parquet scan."""
        import ray.data
        from ray.data.expressions import col

        fs = _arrow_filesystem(self.parts[0], storage)
        out = {}
        for source in self.rows:
            parts = self.parts_of[source]
            ds = ray.data.read_parquet([p.removeprefix("s3://") for p in parts] if fs is not None else parts, filesystem=fs)
            if len(self.parts_of) > 1:
                ds = ds.filter(expr=col("source") == source)
            out[f"{self.spec.name}.{source}"] = ds
        return out

    def first_rows(self, n: int, storage: st.StorageConfig) -> pa.Table:
        table = read_parts(self.parts[:1], storage)
        if self.spec.sources is not None:
            table = table.filter(pc.is_in(table.column("source"), value_set=pa.array(self.spec.sources)))
        return table.slice(0, n)


def _arrow_filesystem(path: str, storage: st.StorageConfig):
    """A pyarrow filesystem for s3:// paths built from the same fsspec settings as all other I/O."""
    if st.scheme(path) != "s3":
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(st.filesystem(path, storage)))


def _run_config(config: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs = _arrow_filesystem(config.storage_path, config.storage)
    storage_path = config.storage_path.removeprefix("s3://") if fs is not None else str(Path(config.storage_path).resolve())
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


def _local_logs(config: TrainConfig) -> tuple[str | None, str | None]:
    """(TensorBoard dir, metrics.jsonl path) on the local disk, or None for a remote run without one."""
    if config.log.tensorboard_dir is not None:
        return config.log.tensorboard_dir, str(Path(config.log.tensorboard_dir) / "metrics.jsonl")
    if st.scheme(config.storage_path) != "file":
        return None, None
    run_dir = Path(config.storage_path).resolve() / config.name
    return str(run_dir / "tensorboard"), str(run_dir / "metrics.jsonl")


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
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the per-step log line says what training needs to know
    context.execution_options.preserve_order = True  # a resumed stream re-reads rows in the same order
    progress.phase("reading dataset manifests")
    data = [LatentDataset(spec, storage) for spec in config.datasets]
    shapes = {}
    for d in data:
        for m, shape in d.latent_shapes.items():
            if shapes.setdefault(m, shape) != shape:
                raise ValueError(f"dataset {d.spec.name!r} has {m} latents {shape}, others {shapes[m]}")
    weights = stream_weights(config.datasets, {d.spec.name: d.source_weights for d in data})
    streams, datasets = {}, {}
    for d in data:
        for name, ds in d.ray_datasets(storage).items():
            datasets[name] = ds
            streams[name] = {"weight": weights[name], "tasks": d.spec.tasks, "synthetic": d.spec.synthetic}
    for name, meta in streams.items():
        progress.log(f"stream {name}: share {meta['weight']:.3f}, tasks {meta['tasks']}")
    val_data = next(d for d in data if d.spec.name == (config.validation.dataset or config.datasets[0].name))
    codecs = data[0].manifest.get("codecs", {})
    st.write_bytes_atomic(st.join(config.run_dir, CONFIG_FILE), dumps(config.model_dump(mode="json")), storage)

    tensorboard_dir, metrics_log = _local_logs(config)
    loop_config = {
        "config": _worker_config(config),
        "streams": streams,
        "latent_shapes": {m: list(s) for m, s in shapes.items()},
        "validation_rows": val_data.first_rows(config.validation.rows, storage),
        "model_info": {"preset": config.model.preset, "latent_shapes": {m: list(s) for m, s in shapes.items()},
                       "codecs": codecs, "pooled": data[0].manifest.get("pooled", {})},
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
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
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
    manifest = {
        "job": "train",
        "config": config.model_dump(mode="json"),
        "config_hash": config_hash(config),
        "datasets": {d.spec.name: {"path": d.spec.path, "rows": d.rows, "source_weights": d.source_weights}
                     for d in data},
        "stream_weights": {n: m["weight"] for n, m in streams.items()},
        "final_metrics": result.metrics,
        "checkpoint": result.checkpoint.path,
        "model_dir": model_dir,
        "tensorboard_dir": tensorboard_dir,
        "train_seconds": round(train_seconds, 1),
        "timings": progress.done(),
        "versions": package_versions(),
    }
    st.write_bytes_atomic(st.join(config.run_dir, MANIFEST), dumps(manifest), storage)
    progress.log(f"done: final loss {result.metrics.get('loss', float('nan')):.4f}, model at {model_dir}")
    return manifest


def _export(checkpoint, model_dir: str, config: TrainConfig, storage: st.StorageConfig) -> None:
    from omniflow.model_dir import export_checkpoint, load_training_checkpoint

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
        st.remove(model_dir, storage)
        st.upload_dir(local, model_dir, storage, last=["config.json"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (see configs/train_*.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=2000 scaling.num_workers=4")
    return p


def _load(args: argparse.Namespace) -> TrainConfig:
    if not args.resume:
        return load_config(TrainConfig, args.config, args.overrides)
    if args.config:
        raise ConfigError("give --config or --resume, not both")
    # an s3:// run directory is read with the storage.* settings given as overrides
    storage = st.StorageConfig(**parse_overrides(args.overrides).get("storage", {}))
    saved = st.join(args.resume, CONFIG_FILE)
    if not st.exists(saved, storage):
        raise ConfigError(f"{args.resume} has no {CONFIG_FILE}: not a run directory of this job")
    return load_config(TrainConfig, json.loads(st.read_bytes(saved, storage)), args.overrides)


def main(argv: list[str] | None = None) -> int:
    return job_main(TrainConfig, run, argv, prog="python -m jobs.train", description=__doc__, parser=parser(), load=_load)


if __name__ == "__main__":
    sys.exit(main())
