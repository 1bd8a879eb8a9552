"""Training batches mixed from several latent streams, with a task drawn per sample.

A training run names datasets (latent shards of an encode job, optionally only some of its
sources), each with a share of the samples and a distribution over tasks. A stream is one
(dataset, source) pair: its share is the dataset's weight split over its sources in proportion to
the sources' curation weights (`source_weight`). Every batch draws how many rows each stream gives
(multinomial, seeded by step and rank), then for every row a task among those its present
modalities allow (`task_choice`). Rows that allow no task are skipped and counted.

`MixedBatches.position()` says how far each stream has read (epoch, rows), and a new
`MixedBatches` given that position skips those rows: a resumed run continues where the
checkpoint was taken instead of re-reading the epoch from its start.

    >>> mix = MixedBatches(streams, batch_size=64, seed=0, rank=0)
    >>> table, tasks = mix.next_batch(step=0)
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from omniflow.modality import MODALITIES, Modality
from omniflow.tasks import Role, Task, get_task
from omniflow.training import Batch
from pipelines.latents import latents_to_tensors
from pipelines.schema import SYNTHETIC_FLAG, latent_column, pooled_column


class DatasetSpec(BaseModel):
    """One training dataset: where its latents are, its share of samples, and its tasks.

    Example (YAML):
        {name: laion, path: s3://bucket/latents, sources: [laion-2b], weight: 800,
         tasks: {t2i: 0.2, i2t: 0.8}, synthetic: false}
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str = Field(description="an encode job's output directory (its manifest lists the shards)")
    sources: list[str] | None = Field(None, description="keep only these sources (default: all)")
    weight: float = Field(1.0, gt=0, description="share of training samples, relative to the other datasets")
    tasks: dict[str, float] = Field(min_length=1, description="task name -> sampling weight")
    synthetic: bool = Field(True, description="use generated modalities; false treats them as absent")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, float]) -> dict[str, float]:
        for name, weight in tasks.items():
            get_task(name)
            if weight < 0:
                raise ValueError(f"task {name!r} has a negative weight {weight}")
        if not any(w > 0 for w in tasks.values()):
            raise ValueError("at least one task needs a positive weight")
        return tasks


def required(task: Task) -> list[Modality]:
    """The modalities a sample must have for `task`: its targets and conditions."""
    return [m for m in MODALITIES if task.roles[m] != Role.ABSENT]


def presence(table: pa.Table, *, synthetic: bool) -> dict[Modality, np.ndarray]:
    """Per modality, which rows hold it (generated ones only when `synthetic`)."""
    out = {}
    for m in MODALITIES:
        has = table.column(f"has_{m.value}").to_numpy(zero_copy_only=False).astype(bool)
        if not synthetic:
            has &= ~table.column(SYNTHETIC_FLAG[m]).to_numpy(zero_copy_only=False).astype(bool)
        out[m] = has
    return out


def task_choice(
    present: Mapping[Modality, np.ndarray], task_weights: Mapping[str, float], rng: np.random.Generator
) -> list[Task | None]:
    """A task per row, drawn from `task_weights` renormalised over the tasks the row allows
    (None where it allows none)."""
    tasks = [get_task(name) for name in task_weights]
    n = len(next(iter(present.values())))
    allowed_NT = np.stack(
        [np.all([present[m] for m in required(t)], axis=0) for t in tasks], axis=1
    ) if n else np.zeros((0, len(tasks)), bool)
    weights_NT = allowed_NT * np.array([task_weights[t.name] for t in tasks], np.float64)
    total_N = weights_NT.sum(axis=1)
    u_N = rng.random(n)
    out: list[Task | None] = []
    for i in range(n):
        if total_N[i] <= 0:
            out.append(None)
            continue
        cumulative = np.cumsum(weights_NT[i]) / total_N[i]
        out.append(tasks[min(int(np.searchsorted(cumulative, u_N[i], side="right")), len(tasks) - 1)])
    return out


@dataclass
class Stream:
    """Rows of one (dataset, source): `open()` starts a pass over them (an epoch)."""

    name: str
    weight: float
    tasks: dict[str, float]
    synthetic: bool
    open: Callable[[], Iterator[pa.Table]]


@dataclass
class _Reader:
    stream: Stream
    cache_bytes: int = 0
    epoch: int = 0
    rows: int = 0  # rows handed out in this epoch
    buffer: list[pa.Table] = field(default_factory=list)
    iterator: Iterator[pa.Table] | None = None
    # A whole epoch kept in memory when it fits in `cache_bytes`: later epochs replay it instead
    # of starting the stream again (which costs seconds of start-up per epoch on small data).
    cache: list[pa.Table] | None = None
    _filling: list[pa.Table] | None = field(default_factory=list)

    def _open(self) -> Iterator[pa.Table]:
        if self.cache is not None:
            return iter(self.cache)
        return iter(self.stream.open())

    def _next_table(self) -> pa.Table:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = self._open()
            for table in self.iterator:
                if table.num_rows:
                    self._remember(table)
                    return table
            if self.cache is None and self._filling is not None:
                self.cache, self._filling = self._filling, None
            if self.rows == 0 and not self.buffer:
                break
            self.iterator, self.epoch, self.rows = None, self.epoch + 1, 0
        raise ValueError(f"stream {self.stream.name!r} has no rows for this worker")

    def _remember(self, table: pa.Table) -> None:
        if self.cache is not None or self._filling is None:
            return
        self._filling.append(table)
        if sum(t.nbytes for t in self._filling) > self.cache_bytes:
            self._filling = None  # too big: stream every epoch

    def skip(self, rows: int) -> None:
        """Discard the first `rows` rows of the current epoch (after a resume)."""
        while rows > 0:
            table = self._next_table()
            if table.num_rows > rows:
                self.buffer.append(table.slice(rows))
            self.rows += min(rows, table.num_rows)
            rows -= table.num_rows

    def take(self, n: int) -> pa.Table:
        """The next `n` rows, wrapping to a new epoch at the end."""
        have, parts = 0, []
        while have < n:
            table = self.buffer.pop(0) if self.buffer else self._next_table()
            need = n - have
            if table.num_rows > need:
                self.buffer.insert(0, table.slice(need))
                table = table.slice(0, need)
            parts.append(table)
            have += table.num_rows
            self.rows += table.num_rows
        return pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]


class MixedBatches:
    """Batches of `batch_size` rows mixed over `streams` by weight, each row with a task."""

    def __init__(
        self,
        streams: Sequence[Stream],
        *,
        batch_size: int,
        seed: int,
        rank: int,
        position: Mapping | None = None,
        cache_bytes: int = 0,
    ):
        if not streams:
            raise ValueError("no streams to mix")
        self.readers = {s.name: _Reader(s, cache_bytes=cache_bytes) for s in streams}
        weights = np.array([s.weight for s in streams], np.float64)
        self.probabilities = weights / weights.sum()
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.skipped_rows = 0  # rows that allowed none of their dataset's tasks
        for name, where in (position or {}).items():
            if name in self.readers:
                reader = self.readers[name]
                reader.epoch = where["epoch"]
                reader.skip(where["rows"])

    def position(self) -> dict[str, dict[str, int]]:
        """How far each stream has read (rows handed out in its current epoch)."""
        return {name: {"epoch": r.epoch, "rows": r.rows} for name, r in self.readers.items()}

    def next_batch(self, step: int) -> tuple[pa.Table, list[Task]]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        counts = rng.multinomial(self.batch_size, self.probabilities)
        tables, tasks = [], []
        for reader, count in zip(self.readers.values(), counts):
            got = 0
            while got < count:
                table = reader.take(count - got)
                chosen = task_choice(presence(table, synthetic=reader.stream.synthetic), reader.stream.tasks, rng)
                keep = np.array([t is not None for t in chosen])
                self.skipped_rows += int((~keep).sum())
                if not keep.any():
                    continue
                tables.append(table.filter(pa.array(keep)))
                tasks.extend(t for t in chosen if t is not None)
                got += int(keep.sum())
        common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
        return pa.concat_tables([t.select(common) for t in tables]), tasks


def to_batch(table: pa.Table, tasks: list[Task]) -> Batch:
    """Latent and pooled tensors of a mixed batch, and its captions where the table has them. Text
    latents sit in the `text` stream."""
    columns = [c for m in MODALITIES for c in (latent_column(m.value), pooled_column(m.value)) if c in table.column_names]
    tensors = latents_to_tensors(table, columns=columns)
    latents = {m.value: tensors[latent_column(m.value)] for m in MODALITIES if latent_column(m.value) in tensors}
    pooled = {m.value: tensors[pooled_column(m.value)] for m in MODALITIES if pooled_column(m.value) in tensors}
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else None
    return Batch(latents=latents, tasks=tasks, pooled=pooled, captions=captions)


def stream_weights(specs: Sequence[DatasetSpec], source_weights: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`dataset.source` (a stream's name) -> share of samples: each dataset's weight split over its sources in
    proportion to their curation weights. `source_weights[dataset][source]` are those weights."""
    out = {}
    total = sum(s.weight for s in specs)
    for spec in specs:
        weights = source_weights[spec.name]
        if not weights:
            raise ValueError(f"dataset {spec.name!r} has no rows" + (f" from sources {spec.sources}" if spec.sources else ""))
        norm = sum(weights.values())
        for source, w in sorted(weights.items()):
            out[f"{spec.name}.{source}"] = spec.weight / total * (w / norm if norm > 0 else 1 / len(weights))
    return out
