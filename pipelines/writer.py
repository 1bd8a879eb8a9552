"""Resumable Parquet output: every write task commits one whole part file, or nothing.

A part is written with `storage.write_parquet_atomic` (temp file + rename locally, a single PUT on
S3), so a reader never sees a partial part, and a killed job leaves only whole parts behind. On a
rerun, `committed_keys` lists the sample keys already written so the job skips them: together this
neither loses nor duplicates a row. A write task that Ray retried after it had committed leaves
its rows twice (or, if the first attempt rejected a row that the retry completed, once in each
output): `deduplicate_parts`, which every job runs after its writes, leaves each key in one place.
"""

import hashlib
import itertools
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from omniflow import storage as st
from pipelines.schema import conform

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


def committed_parts(directory: str, storage: st.StorageConfig) -> list[str]:
    """Whole part files under `directory` (temp files of an interrupted write are not parts)."""
    if not st.exists(directory, storage):
        return []
    return [p for p in st.list_files(st.join(directory, f"part-*{PART_SUFFIX}"), storage)]


def read_parts(paths: list[str], storage: st.StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """Concatenate `columns` of the given part files (all columns when None)."""
    tables = []
    for path in paths:
        with st.open_input(path, storage) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None


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
