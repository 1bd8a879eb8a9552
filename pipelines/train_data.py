"""The training data on the driver and in the workers: each dataset's latent parts as one Ray
Data stream per source, the mixing weights, the validation rows, and the batches a step takes.

    >>> data = [LatentDataset(spec, storage) for spec in config.datasets]     # on the driver
    >>> plan = plan_streams(config.datasets, data, storage, world=2)          # datasets per worker, weights
    >>> micro = micro_batches(mix, groups, step, grad_accum=2, device=device)  # in a worker
"""

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omniflow import storage as st
from omniflow.config import ConfigError
from omniflow.modality import MODALITIES
from omniflow.training import Batch, GroupedBatches
from pipelines.manifest import read_upstream
from pipelines.mixing import (
    SYNTHETIC_FLAG,
    DatasetSpec,
    MixedBatches,
    presence,
    stream_weights,
    task_choice,
    to_batch,
)
from pipelines.parts import read_parts
from pipelines.schema import LATENT_MODALITIES, latent_column, pooled_column

if TYPE_CHECKING:
    import ray.data
    import torch


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
        self.rows_in: dict[str, dict[str, int]] = {}  # part -> source -> its rows there
        rows: dict[str, int] = {}
        weight_sums: dict[str, float] = {}
        for part in self.parts:
            table = read_parts([part], storage, columns=["source", "source_weight"])
            sources = table.column("source").to_numpy(zero_copy_only=False)
            weights = table.column("source_weight").to_numpy(zero_copy_only=False)
            self.sources_in[part] = set(sources)
            self.rows_in[part] = {str(n): int((sources == n).sum()) for n in set(sources)}
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

    def ray_datasets(self, storage: st.StorageConfig, world: int = 1) -> dict[str, list["ray.data.Dataset"]]:
        """Per source, named `<dataset>.<source>`, one Ray dataset per worker, each with rows of its
        own: the source's parts dealt out by rows when there is a part per worker (`deal_parts`),
        else every part with the rows whose key hashes to the worker. Each reads only the parts
        that hold its source, and the source predicate is pushed into the Parquet scan.

        The workers' datasets are independent (not one dataset split between them): a worker
        reads its streams in whatever order its own batches draw them, where the iterators of a
        split dataset must all start each epoch together, and workers that drew different streams
        first would wait on each other forever."""
        import ray.data
        from ray.data.expressions import col

        fs = st.arrow_filesystem(self.parts[0], storage)  # the scheme, which every part shares
        out = {}
        for source in self.rows:
            parts = self.parts_of[source]
            dealt = deal_parts({p: self.rows_in[p][source] for p in parts}, world)
            shards = []
            for rank in range(world):
                mine = dealt[rank] if dealt is not None else parts
                ds = ray.data.read_parquet([st.arrow_path(p) for p in mine], filesystem=fs)
                if len(self.parts_of) > 1:
                    ds = ds.filter(expr=col("source") == source)
                if dealt is None and world > 1:
                    ds = ds.map_batches(rows_of_worker, fn_kwargs={"rank": rank, "world": world},
                                        batch_format="pyarrow", batch_size=None)
                shards.append(ds)
            out[f"{self.spec.name}.{source}"] = shards
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
                for batch in parquet.iter_batches(batch_size=max(n, 256), columns=validation_columns(parquet.schema_arrow)):
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


def validation_columns(schema: pa.Schema) -> list[str]:
    """What `presence` and `to_batch` read, as far as the latents hold it."""
    wanted = ["source", "caption"]
    for m in MODALITIES:
        wanted += [f"has_{m.value}", SYNTHETIC_FLAG[m], latent_column(m.value), pooled_column(m.value)]
    return [c for c in wanted if c in schema.names]


def _allows_a_task(table: pa.Table, spec: DatasetSpec) -> np.ndarray:
    # Whether a row can get a task depends only on its modalities, not on the draw.
    chosen = task_choice(presence(table, synthetic=spec.synthetic), spec.tasks, np.random.default_rng(0))
    return np.array([t is not None for t in chosen], bool)


def deal_parts(rows_by_part: dict[str, int], world: int) -> list[list[str]] | None:
    """The parts dealt to `world` workers so that their rows come out as even as whole parts
    allow (largest part first, to the worker with the fewest rows; each worker's parts in their
    given order), or None when there are fewer parts than workers.

        >>> deal_parts({"a": 5, "b": 3, "c": 2, "d": 1}, 2)
        [['a', 'd'], ['b', 'c']]
    """
    if len(rows_by_part) < world:
        return None
    order = list(rows_by_part)
    shards: list[list[str]] = [[] for _ in range(world)]
    totals = [0] * world
    for part in sorted(order, key=lambda p: -rows_by_part[p]):
        rank = totals.index(min(totals))
        shards[rank].append(part)
        totals[rank] += rows_by_part[part]
    return [sorted(mine, key=order.index) for mine in shards]


def rows_of_worker(table: pa.Table, rank: int, world: int) -> pa.Table:
    """The rows of `table` whose key hashes (CRC-32, the same in every process) to `rank`."""
    keys = table.column("key").to_pylist()
    return table.filter(pa.array([zlib.crc32(k.encode()) % world == rank for k in keys], pa.bool_()))


def shard_name(stream: str, rank: int) -> str:
    """The name under which the driver hands worker `rank` its dataset of `stream`."""
    return f"{stream}@{rank}"


def common_latent_shapes(data: Sequence[LatentDataset]) -> dict[str, tuple[int, ...]]:
    """The latent shape per modality, which every dataset must share."""
    shapes: dict[str, tuple[int, ...]] = {}
    for d in data:
        for m, shape in d.latent_shapes.items():
            if shapes.setdefault(m, shape) != shape:
                raise ValueError(f"dataset {d.spec.name!r} has {m} latents {shape}, others {shapes[m]}")
    return shapes


@dataclass
class StreamPlan:
    """Every (dataset, source) stream: its Ray dataset, and what a worker needs to mix it."""

    datasets: dict[str, "ray.data.Dataset"]  # shard_name(stream, rank) -> that worker's rows of it
    streams: dict[str, dict[str, Any]]  # name -> {"weight", "tasks", "synthetic"}


def plan_streams(specs: Sequence[DatasetSpec], data: Sequence[LatentDataset], storage: st.StorageConfig,
                 world: int = 1) -> StreamPlan:
    """One stream per (dataset, source), weighted by `mixing.stream_weights`, with a dataset of
    its rows for each of `world` workers."""
    weights = stream_weights(specs, {d.spec.name: d.source_weights for d in data})
    datasets, streams = {}, {}
    for d in data:
        for name, shards in d.ray_datasets(storage, world).items():
            datasets.update({shard_name(name, rank): ds for rank, ds in enumerate(shards)})
            streams[name] = {"weight": weights[name], "tasks": d.spec.tasks, "synthetic": d.spec.synthetic}
    return StreamPlan(datasets, streams)


def validation_batches(table: pa.Table | None, spec: DatasetSpec, *, seed: int, device: "torch.device") -> list[Batch]:
    """The validation rows as one batch, each row with a task drawn from `seed` (none when no row
    allows a task of `spec`)."""
    if table is None or table.num_rows == 0:
        return []
    chosen = task_choice(presence(table, synthetic=spec.synthetic), spec.tasks, np.random.default_rng(seed))
    table = table.filter(pa.array([t is not None for t in chosen], pa.bool_()))
    tasks = [t for t in chosen if t is not None]
    if not tasks:
        return []
    return [to_batch(table, tasks).to(device)]


def micro_batches(mix: MixedBatches, groups: GroupedBatches | None, step: int, *, grad_accum: int,
                  device: "torch.device") -> list[Batch]:
    """The `grad_accum` batches of one optimizer step, each drawn from a seed of the step (so a
    resumed run draws the same). With `groups`, mixed batches are drawn until one modality group
    fills a batch; what waits in `groups` at a checkpoint is not in the data position (a resume
    skips it)."""
    micro = []
    for i in range(grad_accum):
        index = step * grad_accum + i
        if groups is None:
            micro.append(to_batch(*mix.next_batch(index)).to(device))
            continue
        draw = 0
        while (batch := groups.pop()) is None:
            groups.push(to_batch(*mix.next_batch(index * 1000 + draw)))
            draw += 1
        micro.append(batch.to(device))
    return micro
