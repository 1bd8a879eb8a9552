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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from jobs.common import Progress, dumps, job_main
from jobs.train_config import TrainConfig
from jobs.train_logs import TENSORBOARD_DIR, metrics_path
from omniflow import storage as st
from omniflow.config import ConfigError, load_config
from omniflow.modality import MODALITIES
from pipelines.manifest import TrainManifest, read_upstream, write_manifest
from pipelines.mixing import SYNTHETIC_FLAG, DatasetSpec, presence, stream_weights, task_choice
from pipelines.parts import read_parts
from pipelines.runtime import init_ray
from pipelines.schema import LATENT_MODALITIES, latent_column, pooled_column

if TYPE_CHECKING:
    import ray.data

CONFIG_FILE = "train_config.json"


class LatentDataset:
    """What training needs to know about one dataset's latent shards, read on the driver."""

    def __init__(self, spec: DatasetSpec, storage: st.StorageConfig):
        manifest = read_upstream(spec.path, storage, job="encode", field=f"datasets[{spec.name}].path")
        self.spec, self.manifest = spec, manifest
        self.parts = sorted(manifest.outputs.latents)  # an order of their own, whatever wrote the manifest
        shapes = manifest.latents.shapes
        self.latent_shapes = {m: tuple(shapes[latent_column(m)]) for m in LATENT_MODALITIES if latent_column(m) in shapes}
        self.parts_of: dict[str, list[str]] = {}  # source -> the parts holding its rows
        self.sources_in: dict[str, set[str]] = {}  # part -> the sources of its rows
        rows: dict[str, int] = {}
        weight_sums: dict[str, float] = {}
        for part in self.parts:
            table = read_parts([part], storage, columns=["source", "source_weight"])
            sources = table.column("source").to_numpy(zero_copy_only=False)
            weights = table.column("source_weight").to_numpy(zero_copy_only=False)
            self.sources_in[part] = set(sources)
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

        fs = _arrow_filesystem(self.parts[0], storage)  # the scheme, which every part shares
        out = {}
        for source in self.rows:
            parts = self.parts_of[source]
            ds = ray.data.read_parquet([p.removeprefix("s3://") for p in parts] if fs is not None else parts, filesystem=fs)
            if len(self.parts_of) > 1:
                ds = ds.filter(expr=col("source") == source)
            out[f"{self.spec.name}.{source}"] = ds
        return out

    def validation_rows(self, n: int, storage: st.StorageConfig) -> pa.Table:
        """The first `n` rows of this dataset's sources that allow one of its tasks, with only the
        columns a validation batch needs. Parts are read in order, only those holding one of its
        sources, and only until `n` rows are found: which part holds what does not matter."""
        sources = pa.array(list(self.rows))
        found: list[pa.Table] = []
        have = 0
        for part in (p for p in self.parts if self.sources_in[p] & self.rows.keys()):
            with st.open_input(part, storage) as f:
                parquet = pq.ParquetFile(f)
                for batch in parquet.iter_batches(batch_size=max(n, 256), columns=_validation_columns(parquet.schema_arrow)):
                    table = pa.Table.from_batches([batch])
                    table = table.filter(pc.is_in(table.column("source"), value_set=sources))
                    table = table.filter(pa.array(_allows_a_task(table, self.spec), pa.bool_()))
                    found.append(table.slice(0, n - have))
                    have += found[-1].num_rows
                    if have >= n:
                        return pa.concat_tables(found)
        if not have:
            raise ConfigError(
                f"validation.dataset {self.spec.name!r}: no row of its sources {list(self.rows)} in {self.spec.path} "
                f"allows one of its tasks {list(self.spec.tasks)}; pick another validation.dataset"
            )
        return pa.concat_tables(found)


def _validation_columns(schema: pa.Schema) -> list[str]:
    """What `presence` and `to_batch` read, as far as the latents hold it."""
    wanted = ["source"]
    for m in MODALITIES:
        wanted += [f"has_{m.value}", SYNTHETIC_FLAG[m], latent_column(m.value), pooled_column(m.value)]
    return [c for c in wanted if c in schema.names]


def _allows_a_task(table: pa.Table, spec: DatasetSpec) -> np.ndarray:
    # Whether a row can get a task depends only on its modalities, not on the draw.
    chosen = task_choice(presence(table, synthetic=spec.synthetic), spec.tasks, np.random.default_rng(0))
    return np.array([t is not None for t in chosen], bool)


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
    val_data = next(d for d in data if d.spec.name == (config.validation.dataset or config.datasets[0].name))
    validation_rows = val_data.validation_rows(config.validation.rows, storage)
    weights = stream_weights(config.datasets, {d.spec.name: d.source_weights for d in data})
    streams, datasets = {}, {}
    for d in data:
        for name, ds in d.ray_datasets(storage).items():
            datasets[name] = ds
            streams[name] = {"weight": weights[name], "tasks": d.spec.tasks, "synthetic": d.spec.synthetic}
    for name, meta in streams.items():
        progress.log(f"stream {name}: share {meta['weight']:.3f}, tasks {meta['tasks']}")
    codecs = data[0].manifest.codecs
    st.write_bytes_atomic(st.join(config.run_dir, CONFIG_FILE), dumps(config.model_dump(mode="json")), storage)

    metrics_log, tensorboard_dir = _log_paths(config)
    loop_config = {
        "config": _worker_config(config),
        "streams": streams,
        "latent_shapes": {m: list(s) for m, s in shapes.items()},
        "validation_rows": validation_rows,
        "model_info": {"preset": config.model.preset, "latent_shapes": {m: list(s) for m, s in shapes.items()},
                       "absent": "skip" if config.objective.rules.skip_absent else "noise",
                       "codecs": codecs, "pooled": data[0].manifest.pooled},
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
    manifest = write_manifest(config.run_dir, TrainManifest.of(
        config, progress.done(),
        datasets={d.spec.name: {"path": d.spec.path, "rows": d.rows, "source_weights": d.source_weights}
                  for d in data},
        stream_weights={n: m["weight"] for n, m in streams.items()},
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
