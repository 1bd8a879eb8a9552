"""Resumable Parquet output: every write task commits one whole part file, or nothing.

A part is written with `storage.write_parquet_atomic` (temp file + rename locally, a single PUT on
S3), so a reader never sees a partial part, and a killed job leaves only whole parts behind. On a
rerun, `committed_keys` lists the sample keys already written so the job skips them: together this
neither loses nor duplicates a row.
"""

import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from pipelines import storage as st
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
        for lo, hi in zip(bounds[:-1], bounds[1:]):
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
