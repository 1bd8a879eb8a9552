"""Every Parquet layout the project writes, in one place; writers and readers import it.

Tensors are fixed-shape columns (Arrow's `fixed_shape_tensor` extension), never pickles, so any
pyarrow reader can open the files. Every layout carries `schema_version`.
"""

import pyarrow as pa

SCHEMA_VERSION = 1

# Row statuses after curation, and the stages a reject can come from.
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"

# A sample as read from a source, before decoding: media stay encoded bytes.
RAW_SAMPLE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # "<source>/<shard>/<row index>", unique per run
        pa.field("source", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),  # the id the source gave the sample
        pa.field("image", pa.binary()),
        pa.field("caption", pa.string()),
        pa.field("audio", pa.binary()),
    ]
)

# As read, with the reject columns, so that a read failure travels with the rows into decoding.
READ_SAMPLE = pa.schema(
    list(RAW_SAMPLE)
    + [pa.field("reject_stage", pa.string()), pa.field("reject_reason", pa.string())]
)

# A decoded and scored sample (one row per input sample, kept or not).
SCORED_SAMPLE = pa.schema(
    list(RAW_SAMPLE)
    + [
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("audio_seconds", pa.float32()),
        pa.field("content_hash", pa.string()),  # sha256 over the media bytes and caption
        pa.field("clip_score", pa.float32()),  # image-text cosine similarity
        pa.field("aesthetic_score", pa.float32()),
        pa.field("clap_score", pa.float32()),  # audio-text cosine similarity
        pa.field("reject_stage", pa.string()),  # null when the sample decoded and scored
        pa.field("reject_reason", pa.string()),
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

# The curated output: scored samples that passed every filter, with the source's weight.
CURATED_SAMPLE = pa.schema(
    [f for f in SCORED_SAMPLE if f.name not in ("reject_stage", "reject_reason")]
    + [pa.field("source_weight", pa.float32(), nullable=False)]
)

# Samples that did not make it: rejected (bad input) or filtered (a rule said no), with why.
DROPPED_SAMPLE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # REJECTED or FILTERED
        pa.field("stage", pa.string(), nullable=False),  # e.g. decode, score, clip_score, duplicate
        pa.field("reason", pa.string(), nullable=False),
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)


def tensor_field(name: str, shape: tuple[int, ...], value_type: pa.DataType = pa.float32()) -> pa.Field:
    """A fixed-shape tensor column: every row holds one tensor of `shape`."""
    return pa.field(name, pa.fixed_shape_tensor(value_type, list(shape)))


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns in its order and types; missing nullable columns are
    filled with nulls. A missing non-nullable column is an error."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"column {field.name!r} is required by the schema but missing")
    return pa.Table.from_arrays(columns, schema=schema)
