"""Helpers for the Arrow batches that flow through the Ray Data stages of every job.

A row in flight carries `schema.REJECT_STAGE` / `schema.REJECT_REASON`: null while it is alive,
set by the stage that gave up on it. Stages read and set them with `rejects` / `with_rejects`;
writers split a batch with `is_rejected` and turn the rejected rows into `DROPPED_SAMPLE` rows with
`dropped_rows`.

    >>> batch = pa.table({"key": ["a", "b"], "source": ["s", "s"], "sample_id": ["0", "1"]})
    >>> stage, reason = rejects(batch)                  # all None: no stage has rejected a row
    >>> stage[1], reason[1] = "decode", "not an image"
    >>> batch = with_rejects(batch, stage, reason)
    >>> dropped_rows(batch).to_pylist()[0]["reason"]
    'not an image'
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.schema import (
    DROPPED_SAMPLE,
    REJECT_REASON,
    REJECT_STAGE,
    REJECTED,
    SCHEMA_VERSION,
    conform,
)


def set_column(table: pa.Table, field: pa.Field | str, values: pa.Array) -> pa.Table:
    """`table` with the column `field` replaced by `values`, or appended when it is absent."""
    name = field if isinstance(field, str) else field.name
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def tensor_rows(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-shape tensor column as one (N, *shape) numpy array."""
    return table.column(name).combine_chunks().to_numpy_ndarray()


def rejects(table: pa.Table) -> tuple[list[str | None], list[str | None]]:
    """(reject stage, reject reason) per row, as lists to update; all None when the columns are
    absent."""
    def values(field: pa.Field) -> list[str | None]:
        if field.name in table.column_names:
            return table.column(field.name).to_pylist()
        return [None] * table.num_rows

    return values(REJECT_STAGE), values(REJECT_REASON)


def with_rejects(table: pa.Table, stage: list[str | None], reason: list[str | None]) -> pa.Table:
    """`table` with its reject columns set from the lists that `rejects` returned."""
    table = set_column(table, REJECT_STAGE, pa.array(stage, REJECT_STAGE.type))
    return set_column(table, REJECT_REASON, pa.array(reason, REJECT_REASON.type))


def is_rejected(table: pa.Table) -> pa.Array:
    """True for the rows a stage rejected (their reason is set)."""
    if REJECT_REASON.name not in table.column_names:
        return pa.array(np.zeros(table.num_rows, bool))
    return table.column(REJECT_REASON.name).is_valid()


def split_rejected(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(live rows, rejected rows) of `table`, each in its order."""
    rejected = is_rejected(table)
    return table.filter(pc.invert(rejected)), table.filter(rejected)


def dropped_rows(table: pa.Table, *, stage: str | None = None) -> pa.Table:
    """The rejected rows of `table` as `DROPPED_SAMPLE` rows, with the stage each names, or `stage`
    for rows of a job that knows only one (synthesis)."""
    _, rejected = split_rejected(table)
    n = rejected.num_rows
    stages = rejected.column(REJECT_STAGE.name) if stage is None else pa.array([stage] * n, pa.string())
    return conform(pa.table({
        "key": rejected.column("key"),
        "source": rejected.column("source"),
        "sample_id": rejected.column("sample_id"),
        "status": pa.array([REJECTED] * n, pa.string()),
        "stage": stages,
        "reason": rejected.column(REJECT_REASON.name),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int16)),
    }), DROPPED_SAMPLE)
