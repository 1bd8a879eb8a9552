"""The latent layout and its reader: schema, storage dtypes, null rows, copies, plain-pyarrow reads."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from omniflow import storage as st
from pipelines.encode import to_storage
from pipelines.latents import latent_layout, latents_to_tensors, read_latents, tensor_from_column
from pipelines.schema import SCHEMA_VERSION, latent_sample_schema, tensor_column

SHAPES = {"image": (4, 2, 2), "text": (3, 5)}


def _table(dtype: str, n: int = 6, *, seed: int = 0) -> tuple[pa.Table, dict[str, torch.Tensor], np.ndarray]:
    """A latent table with random latents; rows 1 and 4 have no image. Returns (table, latents, has_image)."""
    g = torch.Generator().manual_seed(seed)
    latents = {m: torch.randn((n, *shape), generator=g) * 3 for m, shape in SHAPES.items()}
    pooled = torch.randn((n, 7), generator=g)
    has_image = np.array([i not in (1, 4) for i in range(n)])
    schema = latent_sample_schema(latent_shapes=SHAPES, pooled_dims={"text": 7}, dtype=dtype, codec_hash="abc")
    value_type = schema.field("image_latent").type.value_type
    columns = {
        "key": [f"k{i}" for i in range(n)], "source": ["s"] * n, "sample_id": [str(i) for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
        "has_image": has_image, "has_text": np.ones(n, bool), "has_audio": np.zeros(n, bool),
        "image_latent": tensor_column("image_latent", to_storage(latents["image"], dtype), value_type, has_image),
        "text_latent": tensor_column("text_latent", to_storage(latents["text"], dtype), value_type),
        "pooled_text": tensor_column("pooled_text", to_storage(pooled, dtype), value_type),
        "source_weight": np.full(n, 0.5, np.float32),
        "image_synthetic": np.zeros(n, bool), "caption_synthetic": np.zeros(n, bool), "audio_synthetic": np.zeros(n, bool),
        "schema_version": np.full(n, SCHEMA_VERSION, np.int16),
    }
    return pa.table(columns, schema=schema), {**latents, "pooled": pooled}, has_image


def _parquet_round_trip(table: pa.Table) -> pa.Table:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    buffer.seek(0)
    return pq.read_table(buffer)


def test_schema_columns_types_and_metadata():
    schema = latent_sample_schema(latent_shapes=SHAPES, pooled_dims={"text": 7}, dtype="bfloat16", codec_hash="abc")
    assert schema.names == [
        "key", "source", "sample_id", "caption", "has_image", "has_text", "has_audio", "image_latent", "text_latent",
        "pooled_text", "source_weight", "image_synthetic", "caption_synthetic", "audio_synthetic", "schema_version",
    ]
    image = schema.field("image_latent").type
    assert isinstance(image, pa.FixedShapeTensorType) and image.value_type == pa.uint16() and image.shape == [4, 2, 2]
    assert not schema.field("has_image").nullable and schema.field("image_latent").nullable
    layout = latent_layout(schema)
    assert layout.dtype == "bfloat16" and layout.codec_hash == "abc"
    assert layout.shapes == {"image_latent": (4, 2, 2), "text_latent": (3, 5), "pooled_text": (7,)}
    assert latent_sample_schema(latent_shapes=SHAPES, pooled_dims={}, dtype="float16").field("text_latent").type.value_type == pa.float16()
    with pytest.raises(ValueError, match="dtype"):
        latent_sample_schema(latent_shapes=SHAPES, pooled_dims={}, dtype="int8")
    with pytest.raises(ValueError, match="caption"):
        latent_sample_schema(latent_shapes={"caption": (1,)}, pooled_dims={}, dtype="float32")


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_round_trip_through_parquet_per_storage_dtype(dtype, torch_dtype):
    table, latents, has_image = _table(dtype)
    back = _parquet_round_trip(table)
    assert back.schema.equals(table.schema, check_metadata=True)
    tensors = latents_to_tensors(back)
    assert set(tensors) == {"has_image", "has_text", "has_audio", "image_latent", "text_latent", "pooled_text",
                            "source_weight", "image_synthetic", "caption_synthetic", "audio_synthetic", "schema_version"}
    image = tensors["image_latent"]
    assert image.dtype == torch_dtype and image.shape == (6, 4, 2, 2)
    # exactly the stored values: the cast to the storage dtype is the only rounding
    torch.testing.assert_close(image[has_image], latents["image"][has_image].to(torch_dtype), atol=0, rtol=0)
    assert not image[~has_image].any()  # null rows are zeros
    torch.testing.assert_close(tensors["text_latent"], latents["text"].to(torch_dtype), atol=0, rtol=0)
    torch.testing.assert_close(tensors["pooled_text"], latents["pooled"].to(torch_dtype), atol=0, rtol=0)
    assert tensors["has_image"].dtype == torch.bool and tensors["has_image"].tolist() == has_image.tolist()
    assert tensors["source_weight"].dtype == torch.float32


def test_no_copy_for_one_chunk_and_one_copy_for_many():
    table, latents, _ = _table("bfloat16")
    text = table.column("text_latent")
    assert text.num_chunks == 1 and text.null_count == 0
    tensor = tensor_from_column(text)
    assert tensor.data_ptr() == text.chunk(0).storage.values.buffers()[1].address  # a view on Arrow's buffer
    assert tensor.dtype == torch.bfloat16

    # Slices and several chunks (as Ray batches have them) join in one copy with the right rows.
    chunked = pa.chunked_array([text.chunk(0).slice(0, 2), text.chunk(0).slice(3, 3)])
    torch.testing.assert_close(tensor_from_column(chunked), latents["text"][[0, 1, 3, 4, 5]].bfloat16(), atol=0, rtol=0)
    sliced = table.slice(2, 3)
    torch.testing.assert_close(latents_to_tensors(sliced)["image_latent"][0], latents["image"][2].bfloat16(), atol=0, rtol=0)
    batch = table.to_batches(max_chunksize=4)[1]  # a RecordBatch works as well as a Table
    assert latents_to_tensors(batch, columns=["text_latent"])["text_latent"].shape == (2, 3, 5)
    with pytest.raises(ValueError, match="holds no numbers"):
        latents_to_tensors(table, columns=["key"])


def test_read_latents_checks_that_parts_share_a_layout(tmp_path):
    storage = st.StorageConfig()
    first, _, _ = _table("float32", seed=0)
    second, _, _ = _table("float32", seed=1)
    paths = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    for table, path in zip((first, second), paths):
        st.write_parquet_atomic(table, path, storage)
    both = read_latents(paths, storage)
    assert both.num_rows == 12 and latent_layout(both.schema).codec_hash == "abc"
    assert read_latents(paths, storage, columns=["key", "text_latent"]).column_names == ["key", "text_latent"]
    other, _, _ = _table("float16")
    st.write_parquet_atomic(other, str(tmp_path / "c.parquet"), storage)
    with pytest.raises(ValueError, match="latent layout"):
        read_latents([*paths, str(tmp_path / "c.parquet")], storage)
