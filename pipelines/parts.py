"""Parts: the Parquet files every job writes and the next one reads, and the tools for both.

Writing. Every write task commits one whole part file, or nothing.

A part is written with `storage.write_parquet_atomic` (temp file + rename locally, a single PUT on
S3), so a reader never sees a partial part, and a killed job leaves only whole parts behind. On a
rerun, `committed_keys` lists the sample keys already written so the job skips them: together this
neither loses nor duplicates a row. A write task that Ray retried after it had committed leaves
its rows twice (or, if the first attempt rejected a row that the retry completed, once in each
output): `deduplicate_parts`, which every job runs after its writes, leaves each key in one place.
A job whose rows end either kept or rejected writes through one `KeptRejectedSink`, which also
names what a rerun skips (`done_keys`) and de-duplicates both outputs together.

Reading. `read_parts` reads parts on the driver (Arrow, threaded); `index_parts` reads the key and
source of every input row (what is left to do, and the counts), and `read_parts_dataset` reads what
is left with one Ray Data task per part, so the parts' rows never gather on the driver. (Ray Data's
`read_parquet` in its place, with the skip and `prepare` in a task after it, stalled the synthesis
job's first test on the 2-CPU test cluster until it was killed at 5 minutes; with this reader the
whole file passes in 80 s.)

    >>> sink = KeptRejectedSink("s3://bucket/run", "triplets", TRIPLET_SAMPLE, storage)
    >>> reads = index_parts(upstream_parts, storage).reads(skip=sink.done_keys())
    >>> ds = read_parts_dataset(reads, storage, schema=SYNTHESIS_SAMPLE, prepare=start)
    >>> ds.write_datasink(sink); sink.deduplicate(); sink.parts()
"""

import hashlib
import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

from omniflow import storage as st
from pipelines.rows import dropped_rows, split_rejected
from pipelines.schema import DROPPED_SAMPLE, conform

PART_SUFFIX = ".parquet"


class AtomicParquetSink(Datasink):
    """A Ray Data sink writing `directory/part-<uuid>.parquet` per write task, conformed to `schema`.

    With `rows_per_part`, Ray gathers at least that many rows per write task and the task splits
    them evenly into parts of about `rows_per_part` rows, each committed whole.
    """

    def __init__(self, directory: str, schema: pa.Schema, storage: st.StorageConfig, *, rows_per_part: int | None = None):
        self.directory, self.schema, self.storage = directory, schema, storage
        self.rows_per_part = rows_per_part

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_part

    def write(self, blocks: Iterable[pa.Table], ctx) -> list[str]:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        # Ray hands on empty blocks, sometimes without columns: they carry nothing to write.
        tables = [conform(t, self.schema) for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        parts = max(1, round(table.num_rows / self.rows_per_part)) if self.rows_per_part else 1
        bounds = [round(i * table.num_rows / parts) for i in range(parts + 1)]
        paths = []
        for lo, hi in itertools.pairwise(bounds):
            path = st.join(self.directory, f"part-{uuid.uuid4().hex}{PART_SUFFIX}")
            st.write_parquet_atomic(table.slice(lo, hi - lo), path, self.storage)
            paths.append(path)
        return paths


class KeptRejectedSink(Datasink):
    """Commits each write task's rows: live ones as parts of about `rows_per_part` rows under
    `output/<kept>/` in `schema` (a schema, or a function of the task's table for layouts whose
    tensor shapes come from the data), rejected ones as one `DROPPED_SAMPLE` part under
    `output/rejects/` (their stage from the rows, or `reject_stage` for all).

    A killed job leaves only whole parts, so each row is in one of them or in none: the rerun skips
    `done_keys()` (the keys of both directories) and neither loses nor repeats a row.
    """

    def __init__(self, output: str, kept: str, schema: pa.Schema | Callable[[pa.Table], pa.Schema],
                 storage: st.StorageConfig, *, rows_per_part: int | None = None, reject_stage: str | None = None):
        self.output, self.kept, self.schema, self.storage = output, kept, schema, storage
        self.rows_per_part, self.reject_stage = rows_per_part, reject_stage

    @property
    def directories(self) -> dict[str, str]:
        """{kept: its directory, "rejects": its directory}."""
        return {name: st.join(self.output, name) for name in (self.kept, "rejects")}

    @property
    def min_rows_per_write(self) -> int | None:
        # Stages work in small batches; without this every batch would become a tiny part.
        return self.rows_per_part

    def write(self, blocks: Iterable[pa.Table], ctx) -> list[str]:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        live, _ = split_rejected(table)
        schema = self.schema(table) if callable(self.schema) else self.schema
        kept = AtomicParquetSink(self.directories[self.kept], schema, self.storage, rows_per_part=self.rows_per_part)
        rejects = AtomicParquetSink(self.directories["rejects"], DROPPED_SAMPLE, self.storage)
        return kept.write([live], ctx) + rejects.write([dropped_rows(table, stage=self.reject_stage)], ctx)

    def done_keys(self) -> set[str]:
        """Keys already written, kept or rejected: what a rerun skips."""
        return set().union(*(committed_keys(d, self.storage) for d in self.directories.values()))

    def parts(self) -> dict[str, list[str]]:
        """{kept: its parts, "rejects": its parts}, as committed now."""
        return {name: committed_parts(d, self.storage) for name, d in self.directories.items()}

    def deduplicate(self) -> "Deduplicated":
        """After the writes: one copy per key across both outputs, a kept one over a rejected one."""
        parts = self.parts()
        return deduplicate_parts(parts[self.kept], parts["rejects"], storage=self.storage)


def committed_parts(directory: str, storage: st.StorageConfig) -> list[str]:
    """Whole part files under `directory` (temp files of an interrupted write are not parts)."""
    if not st.exists(directory, storage):
        return []
    return [p for p in st.list_files(st.join(directory, f"part-*{PART_SUFFIX}"), storage)]


def read_parts(paths: Sequence[str], storage: st.StorageConfig, columns: Sequence[str] | None = None, *,
               with_part: bool = False, keys: Collection[str] | None = None) -> pa.Table | None:
    """`columns` of the given part files (all columns when None), in their order; None for no
    parts. With `with_part`, a last column "part" names each row's file (as in `paths`); with
    `keys`, only the rows with those keys (pushed into the scan). Arrow reads the files in parallel
    threads, from S3 through its native client."""
    if not paths:
        return None
    dataset = pads.dataset([st.arrow_path(p) for p in paths], format="parquet",
                           filesystem=st.arrow_filesystem(paths[0], storage))
    names = list(columns) if columns is not None else dataset.schema.names
    where = pc.field("key").isin(list(keys)) if keys is not None else None
    if not with_part:
        return dataset.to_table(columns=names, filter=where)
    table = dataset.to_table(columns=[*names, "__filename"], filter=where)  # Arrow's name for a row's file
    part_of = {st.arrow_path(p): p for p in paths}
    part = pa.array([part_of[f] for f in table.column("__filename").to_pylist()], pa.string())
    return table.set_column(len(names), "part", part)


def read_part(path: str, storage: st.StorageConfig, *, columns: Sequence[str] | None = None,
              skip: Iterable[str] = (), rows_per_block: int | None = None) -> Iterator[pa.Table]:
    """The rows of one part whose key is not in `skip`, in blocks of at most `rows_per_block` rows
    (the whole part at once when None). Of `columns`, those the part has."""
    skip = pa.array(list(skip), pa.string())
    with st.open_input(path, storage) as f:
        part = pq.ParquetFile(f)
        names = [c for c in columns if c in part.schema_arrow.names] if columns is not None else None
        batches = part.iter_batches(batch_size=rows_per_block, columns=names) if rows_per_block else [part.read(columns=names)]
        for batch in batches:
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            if len(skip):
                table = table.filter(pc.invert(pc.is_in(table.column("key"), skip)))
            if table.num_rows:
                yield table


def committed_keys(directory: str, storage: st.StorageConfig) -> set[str]:
    """Sample keys already written to `directory`."""
    table = read_parts(committed_parts(directory, storage), storage, columns=["key"])
    return set(table.column("key").to_pylist()) if table is not None else set()


@dataclass(frozen=True)
class Deduplicated:
    """Rows that `deduplicate_parts` removed, from the kept and from the rejected outputs."""

    kept: int = 0
    rejected: int = 0

    @property
    def rows(self) -> int:
        return self.kept + self.rejected


def deduplicate_parts(kept: Sequence[str], rejected: Sequence[str] = (), *, storage: st.StorageConfig) -> Deduplicated:
    """Rewrite the given parts so that each key is in exactly one row across all of them.

    Which copy of a key stays: a kept one over a rejected one (a retried task that first failed,
    then succeeded, completed the row), then the one with the smallest digest of its values. So
    the rows that stay depend only on the rows, never on the parts' order or names (those decide
    only which part holds one of several identical copies). Each part is rewritten atomically, a
    part left empty is removed, and the copy that stays is never removed: a job killed part-way
    loses nothing, and its rerun ends where an uninterrupted one would. Parts without repeated
    keys are only read (their key column).

        >>> import tempfile
        >>> storage, out = st.StorageConfig(), tempfile.mkdtemp()
        >>> rows = pa.table({"key": ["a", "b"], "x": [1, 2]})
        >>> for name in ("part-1.parquet", "part-2.parquet"):  # a write task that Ray ran twice
        ...     st.write_parquet_atomic(rows, st.join(out, "kept", name), storage)
        >>> st.write_parquet_atomic(rows.slice(0, 1), st.join(out, "rejects", "part-3.parquet"), storage)
        >>> deduplicate_parts(committed_parts(st.join(out, "kept"), storage),
        ...                   committed_parts(st.join(out, "rejects"), storage), storage=storage)
        Deduplicated(kept=2, rejected=1)
        >>> len(committed_parts(st.join(out, "kept"), storage)), committed_parts(st.join(out, "rejects"), storage)
        (1, [])
    """
    ranked = [(path, 0) for path in kept] + [(path, 1) for path in rejected]
    assert len({path for path, _ in ranked}) == len(ranked), "a part listed twice"
    keys = {path: _keys(path, storage) for path, _ in ranked}
    counts = Counter(key for part in keys.values() for key in part)
    repeated = {key for key, n in counts.items() if n > 1}
    if not repeated:
        return Deduplicated()
    best: dict[str, tuple] = {}  # repeated key -> its copy that stays, as (rank, digest, path, row)
    for path, rank in ranked:
        rows = [i for i, key in enumerate(keys[path]) if key in repeated]
        if rows:
            table = read_parts([path], storage).take(pa.array(rows, pa.int64()))
            for i, digest in zip(rows, _row_digests(table)):
                copy, key = (rank, digest, path, i), keys[path][i]
                best[key] = min(best.get(key, copy), copy)
    dropped = [0, 0]
    for path, rank in ranked:
        keep = [key not in repeated or best[key][2:] == (path, i) for i, key in enumerate(keys[path])]
        if all(keep):
            continue
        dropped[rank] += keep.count(False)
        if any(keep):
            st.write_parquet_atomic(read_parts([path], storage).filter(pa.array(keep)), path, storage)
        else:
            st.remove(path, storage)
    return Deduplicated(kept=dropped[0], rejected=dropped[1])


def _keys(path: str, storage: st.StorageConfig) -> list[str]:
    return read_parts([path], storage, columns=["key"]).column("key").to_pylist()


def _row_digests(table: pa.Table) -> list[str]:
    """A digest of each row's values, by column name (so column order does not matter)."""
    names = sorted(table.column_names)
    columns = [_values(table.column(name)) for name in names]
    return [hashlib.sha256(repr(list(zip(names, row))).encode()).hexdigest() for row in zip(*columns)]


def _values(column: pa.ChunkedArray) -> list:
    """A column's values as Python objects; a tensor's as its bytes (far faster than its floats)."""
    if not isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_pylist()
    lists = column.combine_chunks().storage
    size = lists.type.list_size
    flat = lists.values.slice(lists.offset * size, len(lists) * size).to_numpy(zero_copy_only=False)
    rows = flat.reshape(len(lists), size)
    return [row.tobytes() if valid else None for row, valid in zip(rows, lists.is_valid().to_pylist())]


# ---- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartIndex:
    """The key and source of every row of a job's input parts."""

    rows: pa.Table  # key, source: one row per key (a key two parts hold counts once)
    repeated_keys: int  # rows beyond the first of a key: a retried write upstream
    keys_by_part: dict[str, list[str]]

    @classmethod
    def of(cls, table: pa.Table | None, parts: Sequence[str]) -> "PartIndex":
        """The index of `parts` from their rows' key, source and part columns (`read_parts` with
        `with_part`); None for no parts."""
        schema = pa.schema([pa.field("key", pa.string()), pa.field("source", pa.string())])
        if table is None:
            return cls(rows=schema.empty_table(), repeated_keys=0, keys_by_part={})
        rows = table.select(["key", "source"]).cast(schema)
        keys = rows.column("key").to_numpy(zero_copy_only=False).astype(str)
        _, first = np.unique(keys, return_index=True)
        unique = rows.take(pa.array(np.sort(first), pa.int64()))
        keys_by_part: dict[str, list[str]] = {p: [] for p in parts}
        for key, part in zip(keys.tolist(), table.column("part").to_pylist()):
            keys_by_part[part].append(key)
        return cls(rows=unique, repeated_keys=rows.num_rows - unique.num_rows, keys_by_part=keys_by_part)

    def count_by_source(self) -> dict[str, int]:
        return dict(sorted(Counter(self.rows.column("source").to_pylist()).items()))

    def reads(self, skip: Collection[str] = ()) -> list[dict[str, Any]]:
        """The reads of every row whose key is not in `skip` (for a resumed job, the keys already
        written): {"path", "skip"} per part that has such a row, for `read_parts_dataset`."""
        reads = []
        for path, keys in self.keys_by_part.items():
            unique = set(keys)
            skipped = sorted(unique.intersection(skip))
            if len(skipped) < len(unique):
                reads.append({"path": st.absolute(path), "skip": skipped})
        return reads


def index_parts(parts: Sequence[str], storage: st.StorageConfig) -> PartIndex:
    """Index `parts` by their key and source columns (one threaded scan of two small columns)."""
    return PartIndex.of(read_parts(parts, storage, ["key", "source"], with_part=True), parts)


def one_task_per_item(items: Sequence[dict[str, Any]], fn: Callable[..., Iterator[pa.Table]], *,
                      fn_kwargs: dict[str, Any], num_cpus: float, **remote_args) -> "ray.data.Dataset":
    """A Ray Data dataset made by `fn` over `items` (dicts of plain values), one task per item, so
    that reads run in parallel on the workers and never on the driver."""
    return ray.data.from_items(list(items), override_num_blocks=len(items)).map_batches(
        fn, fn_kwargs=fn_kwargs, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus, **remote_args)


def read_parts_dataset(
    reads: Sequence[dict[str, Any]],
    storage: st.StorageConfig,
    *,
    schema: pa.Schema,
    columns: Sequence[str] | None = None,
    prepare: Callable[[pa.Table], pa.Table] | None = None,
    rows_per_block: int | None = None,
    num_cpus: float = 0.5,
) -> "ray.data.Dataset":
    """The rows `reads` (from `PartIndex.reads`) name, one read task per part, each block through
    `prepare` (a picklable function) and conformed to `schema`.

    Blocks hold at most `rows_per_block` rows, so wide rows (media bytes) never sit in memory a
    whole part at a time.
    """
    if not reads:
        return ray.data.from_arrow(schema.empty_table())
    return one_task_per_item(
        reads, _read_items,
        fn_kwargs={"storage": storage, "schema": schema, "columns": columns, "prepare": prepare,
                   "rows_per_block": rows_per_block},
        num_cpus=num_cpus,
        # A read that fails on a transient storage error is retried. Being an option that actor
        # stages lack, it also keeps Ray from fusing the read into the next actor stage: fused, one
        # actor task would take a batch's worth of parts and read them one after another.
        max_retries=3,
    )


def _read_items(batch: pa.Table, *, storage: st.StorageConfig, schema: pa.Schema, columns: Sequence[str] | None,
                prepare: Callable[[pa.Table], pa.Table] | None, rows_per_block: int | None) -> Iterator[pa.Table]:
    empty = True
    for item in batch.to_pylist():
        for table in read_part(item["path"], storage, columns=columns, skip=item["skip"] or (),
                               rows_per_block=rows_per_block):
            empty = False
            yield conform(prepare(table) if prepare else table, schema)
    if empty:  # a block with the right columns, so that stages downstream see the schema
        yield schema.empty_table()
