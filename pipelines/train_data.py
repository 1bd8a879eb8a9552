"""The training data on the driver and in the workers: each dataset's latent parts as one Ray
Data stream per source, the mixing weights, the validation rows, and the batches a step takes.

    >>> data = [LatentDataset(spec, storage) for spec in config.datasets]     # on the driver
    >>> plan = plan_streams(config.datasets, data, storage)                   # Ray datasets + weights
    >>> micro = micro_batches(mix, groups, step, grad_accum=2, device=device)  # in a worker
"""

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

        fs = st.arrow_filesystem(self.parts[0], storage)  # the scheme, which every part shares
        out = {}
        for source in self.rows:
            ds = ray.data.read_parquet([st.arrow_path(p) for p in self.parts_of[source]], filesystem=fs)
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
    wanted = ["source"]
    for m in MODALITIES:
        wanted += [f"has_{m.value}", SYNTHETIC_FLAG[m], latent_column(m.value), pooled_column(m.value)]
    return [c for c in wanted if c in schema.names]


def _allows_a_task(table: pa.Table, spec: DatasetSpec) -> np.ndarray:
    # Whether a row can get a task depends only on its modalities, not on the draw.
    chosen = task_choice(presence(table, synthetic=spec.synthetic), spec.tasks, np.random.default_rng(0))
    return np.array([t is not None for t in chosen], bool)


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

    datasets: dict[str, "ray.data.Dataset"]
    streams: dict[str, dict[str, Any]]  # name -> {"weight", "tasks", "synthetic"}


def plan_streams(specs: Sequence[DatasetSpec], data: Sequence[LatentDataset], storage: st.StorageConfig) -> StreamPlan:
    """One stream per (dataset, source), weighted by `mixing.stream_weights`."""
    weights = stream_weights(specs, {d.spec.name: d.source_weights for d in data})
    datasets, streams = {}, {}
    for d in data:
        for name, ds in d.ray_datasets(storage).items():
            datasets[name] = ds
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
