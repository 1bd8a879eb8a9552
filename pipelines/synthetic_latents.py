"""A latent dataset made up on the spot: the layout and manifest an encode job writes, filled with
class patterns plus noise. For measuring and testing training (throughput on a new cluster, the
data path, fault recovery) before any real data is encoded.

    >>> write_latent_dataset(Path("/tmp/latents"), {"image": (4, 8, 8), "text": (8, 32)},
    ...                      {"pairs": (["image", "caption"], 1000, 1.0)})
"""

from pathlib import Path

import numpy as np
import pyarrow as pa

from omniflow.config import config_hash
from omniflow.storage import StorageConfig, write_parquet_atomic
from pipelines.manifest import EncodeManifest, write_manifest
from pipelines.schema import (
    LATENT_MODALITIES,
    LATENT_STORAGE,
    MODALITY_OF_COLUMN,
    SCHEMA_VERSION,
    latent_column,
    latent_sample_schema,
    tensor_column,
)


def write_latent_dataset(
    out: Path, shapes: dict[str, tuple], sources: dict[str, tuple[list[str], int, float]], *, seed: int = 0,
    parts: int = 2, codecs: dict[str, dict] | None = None, pooled: dict[str, dict] | None = None,
) -> dict:
    """`sources`: name -> (media present, e.g. ["image", "caption"], rows, source weight);
    `codecs`, `pooled`: what the manifest says made the latents and pooled vectors (none by
    default; no pooled vectors are written either way).

    Each row belongs to one of 4 classes; every modality's latent is its class's fixed pattern
    plus noise, so the modalities predict each other and a model can learn."""
    rng = np.random.default_rng(seed)
    patterns = {m: rng.normal(size=(4, *s)).astype(np.float32) for m, s in shapes.items()}
    schema = latent_sample_schema(latent_shapes=shapes, pooled_dims={}, dtype="float32")
    tables = []
    for source, (media, rows, weight) in sources.items():
        label = rng.integers(0, 4, rows)
        columns = {
            "key": [f"{source}/s/{i}" for i in range(rows)], "source": [source] * rows,
            "sample_id": [str(i) for i in range(rows)], "caption": [f"class {c}" for c in label],
            "source_weight": pa.array([weight] * rows, pa.float32()),
            "image_synthetic": [False] * rows, "caption_synthetic": [False] * rows, "audio_synthetic": [False] * rows,
            "schema_version": pa.array([SCHEMA_VERSION] * rows, pa.int16()),
        }
        present = {MODALITY_OF_COLUMN[m] for m in media}
        for m, shape in shapes.items():
            valid = np.full(rows, m in present)
            values = patterns[m][label] + 0.1 * rng.normal(size=(rows, *shape)).astype(np.float32)
            columns[f"has_{m}"] = valid
            columns[latent_column(m)] = tensor_column(latent_column(m), values, LATENT_STORAGE["float32"], valid)
        tables.append(pa.table(columns))
    table = pa.concat_tables(tables)
    table = pa.Table.from_arrays([table.column(f.name) for f in schema], schema=schema)
    order = rng.permutation(table.num_rows)
    table = table.take(order)
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        path = str(out / "latents" / f"part-{i}.parquet")
        write_parquet_atomic(table.take(chunk), path, StorageConfig())
        paths.append(path)
    made_up = {"shapes": {m: list(s) for m, s in shapes.items()}, "sources": sources, "seed": seed, "parts": parts}
    manifest = EncodeManifest(
        config={"synthetic_latents": made_up}, config_hash=config_hash(made_up), input=None,
        counts={s: {"input": rows, "encoded": rows, "rejected": 0,
                    "encoded_with": {m: rows * (m in {MODALITY_OF_COLUMN[x] for x in media}) for m in shapes}}
                for s, (media, rows, _) in sources.items()},
        modalities={"encoded": list(shapes), "left_out": [m for m in LATENT_MODALITIES if m not in shapes]},
        latents={"dtype": "float32", "storage_type": str(LATENT_STORAGE["float32"]),
                 "shapes": {latent_column(m): list(s) for m, s in shapes.items()},
                 "codec_config_hash": config_hash({"codecs": {}, "pooled": {}})},
        codecs=codecs or {}, pooled=pooled or {}, outputs={"latents": paths, "rejects": []},
    )
    return write_manifest(str(out), manifest, StorageConfig())
