"""Synthesis input and output on Ray Data: curated parts in, triplets and rejects parts out.

Kept apart from the job module so that Ray workers, which import what they run, load only this.

    >>> ds = ray.data.from_items([{"path": p, "skip": []} for p in curated_parts]).map_batches(
    ...     read_curated_part, fn_kwargs={"storage": storage, "fill": ["image"]}, batch_size=1,
    ...     batch_format="pyarrow")
    >>> ds.write_datasink(TripletSink("s3://bucket/run", storage, rows_per_part=256))
"""

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from omniflow import storage as st
from pipelines.generators.stage import REJECT_REASON, start_rows
from pipelines.schema import DROPPED_SAMPLE, REJECTED, SCHEMA_VERSION, TRIPLET_SAMPLE
from pipelines.writer import AtomicParquetSink, read_parts

STAGE = "synthesize"  # the `stage` of every reject synthesis writes


def read_curated_part(batch: pa.Table, storage: st.StorageConfig, fill: list[str]) -> pa.Table:
    """Ray Data task: each row names a curated part (`path`) and the keys in it already done
    (`skip`); returns the part's other rows as synthesis rows (`start_rows`)."""
    tables = []
    for path, skip in zip(batch.column("path").to_pylist(), batch.column("skip").to_pylist()):
        part = read_parts([path], storage)
        if skip:
            part = part.filter(pc.invert(pc.is_in(part.column("key"), pa.array(skip, pa.string()))))
        tables.append(start_rows(part, fill))
    return pa.concat_tables(tables)


def rejects_of(table: pa.Table) -> pa.Table:
    """The rejected synthesis rows of `table` as `DROPPED_SAMPLE` rows."""
    dropped = table.filter(table.column(REJECT_REASON.name).is_valid())
    n = dropped.num_rows
    return pa.table({
        "key": dropped.column("key"),
        "source": dropped.column("source"),
        "sample_id": dropped.column("sample_id"),
        "status": pa.array([REJECTED] * n, pa.string()),
        "stage": pa.array([STAGE] * n, pa.string()),
        "reason": dropped.column(REJECT_REASON.name),
        "schema_version": pa.array([SCHEMA_VERSION] * n, pa.int16()),
    })


class TripletSink(Datasink):
    """Writes each task's live rows as `triplets/` parts (about `rows_per_part` rows each) and its
    rejected rows as one `rejects/` part, each committed whole by `AtomicParquetSink`."""

    def __init__(self, output: str, storage: st.StorageConfig, *, rows_per_part: int | None = None):
        self.triplets = AtomicParquetSink(st.join(output, "triplets"), TRIPLET_SAMPLE, storage,
                                          rows_per_part=rows_per_part)
        self.rejects = AtomicParquetSink(st.join(output, "rejects"), DROPPED_SAMPLE, storage)

    @property
    def min_rows_per_write(self) -> int | None:
        # Generators work in small batches; without this every batch would become a tiny part.
        return self.triplets.min_rows_per_write

    def write(self, blocks: Iterable[pa.Table], ctx) -> list[str]:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        live = table.filter(table.column(REJECT_REASON.name).is_null())
        return self.triplets.write([live], ctx) + self.rejects.write([rejects_of(table)], ctx)
