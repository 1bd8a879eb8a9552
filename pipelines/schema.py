"""Every Parquet layout the project writes, in one place; writers and readers import it.

Tensors are fixed-shape columns (Arrow's `fixed_shape_tensor` extension), never pickles, so any
pyarrow reader can open the files. Every layout carries `schema_version`.
"""

import json
from typing import Literal

import numpy as np
import pyarrow as pa

from omniflow.modality import MODALITIES, Modality

SCHEMA_VERSION = 1

# The one mapping between the model's modalities and the raw media columns: text is stored as its
# caption. Every other list of modality or media names is derived from these.
MEDIA_COLUMN: dict[Modality, str] = {Modality.IMAGE: "image", Modality.TEXT: "caption", Modality.AUDIO: "audio"}
MODALITY_OF_COLUMN: dict[str, Modality] = {column: m for m, column in MEDIA_COLUMN.items()}
MEDIA_COLUMNS: tuple[str, ...] = tuple(MEDIA_COLUMN[m] for m in MODALITIES)  # ("image", "caption", "audio")
MediaName = Literal[MEDIA_COLUMNS]  # a media column's name, as configs spell it
SYNTHETIC_FLAG: dict[Modality, str] = {m: f"{column}_synthetic" for m, column in MEDIA_COLUMN.items()}

# Row statuses after curation, and the stages a reject can come from.
KEPT, FILTERED, REJECTED = "kept", "filtered", "rejected"

# The two columns a row carries through the stages of a job: null while it is alive; once set, the
# stage that rejected it and why. Writers turn such rows into `DROPPED_SAMPLE` rows.
REJECT_STAGE = pa.field("reject_stage", pa.string())
REJECT_REASON = pa.field("reject_reason", pa.string())

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
    list(RAW_SAMPLE) + [REJECT_STAGE, REJECT_REASON]
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
        # The CLIP image embedding (unit vector, its length is the CLIP model's width), kept for
        # near-duplicate removal; curated shards leave it out.
        pa.field("image_embedding", pa.list_(pa.float16())),
        REJECT_STAGE,  # null when the sample decoded and scored
        REJECT_REASON,
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

# The curated output: scored samples that passed every filter, with the source's weight.
CURATED_SAMPLE = pa.schema(
    [f for f in SCORED_SAMPLE if f.name not in ("image_embedding", REJECT_STAGE.name, REJECT_REASON.name)]
    + [pa.field("source_weight", pa.float32(), nullable=False)]
)

# Where a generated modality came from: enough to regenerate it exactly.
PROVENANCE = pa.struct(
    [
        pa.field("generator", pa.string()),  # e.g. "diffusers:StableDiffusion3Pipeline", "shapesworld-renderer"
        pa.field("checkpoint", pa.string()),  # model id or path; the renderer's version for ShapesWorld
        pa.field("seed", pa.int64()),
        pa.field("parameters", pa.string()),  # JSON of the generation parameters (steps, guidance, size...)
    ]
)

# A curated sample with every modality filled: generated ones carry `<modality>_synthetic` = true
# and their provenance (null for a modality the source supplied).
TRIPLET_SAMPLE = pa.schema(
    list(CURATED_SAMPLE)
    + [
        pa.field("image_synthetic", pa.bool_(), nullable=False),
        pa.field("caption_synthetic", pa.bool_(), nullable=False),
        pa.field("audio_synthetic", pa.bool_(), nullable=False),
        pa.field("image_provenance", PROVENANCE),
        pa.field("caption_provenance", PROVENANCE),
        pa.field("audio_provenance", PROVENANCE),
    ]
)

# A benchmark sample the evaluation job generated from: the benchmark's own media (its conditions
# and the reference for the target), the task, the sample's seed and what the model generated (the
# task's target; the other generated columns stay null).
EVAL_SAMPLE = pa.schema(
    list(RAW_SAMPLE)
    + [
        pa.field("task", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("generated_image", pa.binary()),  # PNG
        pa.field("generated_caption", pa.string()),
        pa.field("generated_audio", pa.binary()),  # WAV
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

# Per-sample scores of the evaluation job (null where a metric does not apply to the task).
EVAL_SCORE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("clip_score", pa.float32()),  # 100 * max(cos, 0), generated image vs caption
        pa.field("clap_score", pa.float32()),  # the same for generated audio vs caption
        pa.field("image_reward", pa.float32()),  # ImageReward of a generated image for its caption
        pa.field("cider", pa.float32()),  # generated caption vs the reference caption
        pa.field("bleu4", pa.float32()),
        pa.field("rouge_l", pa.float32()),
        pa.field("checks", pa.string()),  # a concept checker's JSON: attribute -> read back right
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

# The rows of a benchmark that the evaluation job captions as one sample (the same condition medium):
# each row's key, the key of the sample it belongs to (the group's first key), and its caption.
EVAL_REFERENCE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("sample", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
    ]
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


def tensor_field(name: str, shape: tuple[int, ...], value_type: pa.DataType = pa.float32()) -> pa.Field:  # noqa: B008
    """A fixed-shape tensor column: every row holds one tensor of `shape`."""
    return pa.field(name, pa.fixed_shape_tensor(value_type, list(shape)))


def tensor_column(name: str, rows: np.ndarray, value_type: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """(N, *shape) array -> a fixed-shape tensor column of `value_type`, null where not `valid`
    (also for N = 0, unlike `pa.FixedShapeTensorArray.from_numpy_ndarray`)."""
    size = int(np.prod(rows.shape[1:]))
    values = pa.array(np.ascontiguousarray(rows).reshape(-1), type=value_type)
    mask = None if valid is None else pa.array(~valid, pa.bool_())
    storage = pa.FixedSizeListArray.from_arrays(values, size, mask=mask)
    return pa.ExtensionArray.from_storage(tensor_field(name, rows.shape[1:], value_type).type, storage)


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


# ---- Latents (jobs/encode) -------------------------------------------------------------------
# One row per encoded sample. A modality's tensor column exists when a codec for it is configured
# and is null in rows without that modality; `has_<modality>` is the presence mask. Tensors are
# stored as `LATENT_STORAGE[dtype]`: bfloat16 has no Arrow type, so its raw 16-bit patterns are
# kept as uint16 (`pipelines.latents` views them back as torch.bfloat16 without converting).
LATENT_MODALITIES = tuple(m.value for m in MODALITIES)  # ("image", "text", "audio")
LATENT_STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}
LATENT_DTYPE_KEY, LATENT_SHAPES_KEY, CODEC_HASH_KEY = (
    b"omniflow.latent_dtype", b"omniflow.latent_shapes", b"omniflow.codec_config_hash"
)


def latent_column(modality: str) -> str:
    """`image` -> `image_latent`: the column holding a modality's codec latents."""
    return f"{modality}_latent"


def pooled_column(modality: str) -> str:
    """`text` -> `pooled_text`: the column holding a modality's pooled conditioning vector."""
    return f"pooled_{modality}"


def latent_sample_schema(
    *,
    latent_shapes: dict[str, tuple[int, ...]],
    pooled_dims: dict[str, int],
    dtype: str,
    codec_hash: str | None = None,
) -> pa.Schema:
    """The latent shard layout for the given per-modality latent shapes and pooled widths.

    Metadata holds the storage dtype, every tensor column's shape (JSON) and the codec configs'
    hash, so a reader can check what it got without the job's manifest.

        >>> schema = latent_sample_schema(latent_shapes={"image": (4, 8, 8)}, pooled_dims={}, dtype="bfloat16")
        >>> schema.field("image_latent").type.value_type, schema.field("image_latent").type.shape
        (DataType(uint16), [4, 8, 8])
    """
    if dtype not in LATENT_STORAGE:
        raise ValueError(f"dtype must be one of {sorted(LATENT_STORAGE)}, got {dtype!r}")
    unknown = sorted(set(latent_shapes) - set(LATENT_MODALITIES)) + sorted(set(pooled_dims) - set(LATENT_MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected names from {LATENT_MODALITIES}")
    value_type = LATENT_STORAGE[dtype]
    shapes = {latent_column(m): tuple(latent_shapes[m]) for m in LATENT_MODALITIES if m in latent_shapes}
    shapes |= {pooled_column(m): (int(pooled_dims[m]),) for m in LATENT_MODALITIES if m in pooled_dims}
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("caption", pa.string()),  # the raw caption the text latent was made from
        *[pa.field(f"has_{m}", pa.bool_(), nullable=False) for m in LATENT_MODALITIES],
        *[tensor_field(name, shape, value_type) for name, shape in shapes.items()],
        pa.field("source_weight", pa.float32(), nullable=False),
        pa.field("image_synthetic", pa.bool_(), nullable=False),
        pa.field("caption_synthetic", pa.bool_(), nullable=False),
        pa.field("audio_synthetic", pa.bool_(), nullable=False),
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
    metadata = {
        LATENT_DTYPE_KEY: dtype.encode(),
        LATENT_SHAPES_KEY: json.dumps({name: list(shape) for name, shape in shapes.items()}).encode(),
        CODEC_HASH_KEY: (codec_hash or "").encode(),
    }
    return pa.schema(fields, metadata=metadata)
