"""Reading latent shards (`pipelines.schema.latent_sample_schema`) into torch tensors.

Training reads exactly this: `latents_to_tensors` takes a pyarrow Table or RecordBatch (a Ray Data
`iter_batches(batch_format="pyarrow")` batch, or `read_latents` of some parts) and returns one
tensor per column that holds numbers. A fixed-shape tensor column becomes (N, *shape) built on its
Arrow value buffer: no copy at all for one chunk without nulls, one copy otherwise (chunks joined,
null rows zeroed). bfloat16 latents, stored as their raw 16-bit patterns, come back as
torch.bfloat16 by reinterpreting the same bytes.

    >>> table = read_latents(manifest["outputs"]["latents"], StorageConfig())   # doctest: +SKIP
    >>> batch = latents_to_tensors(table)                                       # doctest: +SKIP
    >>> batch["image_latent"].shape, batch["has_image"].dtype                   # doctest: +SKIP
    (torch.Size([1024, 4, 8, 8]), torch.bool)

A zero-copy tensor shares Arrow's read-only memory: clone it before writing into it in place.
"""

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from omniflow import storage as st
from pipelines.schema import CODEC_HASH_KEY, LATENT_DTYPE_KEY, LATENT_SHAPES_KEY

# Arrow storage type of a tensor column -> (numpy view dtype, torch dtype). uint16 holds bfloat16
# bits: numpy has no bfloat16, so the bytes are viewed as int16 and reinterpreted by torch.
_VIEWS = {
    pa.float32(): (np.float32, torch.float32),
    pa.float16(): (np.float16, torch.float16),
    pa.uint16(): (np.int16, torch.bfloat16),
}
# Scalar columns that training uses (presence mask, weights, flags); strings stay in Arrow.
_SCALARS = {pa.bool_(): torch.bool, pa.float32(): torch.float32, pa.int16(): torch.int16}


@dataclass(frozen=True)
class LatentLayout:
    """What a latent shard's schema metadata says: storage dtype, tensor shapes, codec hash."""

    dtype: str
    shapes: dict[str, tuple[int, ...]]
    codec_hash: str


def latent_layout(schema: pa.Schema) -> LatentLayout:
    """The layout recorded in a latent schema's metadata (`ValueError` if it has none)."""
    meta = schema.metadata or {}
    if LATENT_DTYPE_KEY not in meta or LATENT_SHAPES_KEY not in meta:
        raise ValueError("not a latent shard schema: its metadata has no latent dtype and shapes")
    shapes = {name: tuple(shape) for name, shape in json.loads(meta[LATENT_SHAPES_KEY]).items()}
    return LatentLayout(meta[LATENT_DTYPE_KEY].decode(), shapes, meta.get(CODEC_HASH_KEY, b"").decode())


def _is_tensor(type_: pa.DataType) -> bool:
    return isinstance(type_, pa.FixedShapeTensorType)


def _chunk_rows(chunk: pa.Array, row_size: int, np_dtype: type) -> np.ndarray:
    """(len(chunk), row_size) view on a fixed-shape tensor chunk's value buffer, offsets applied."""
    storage = chunk.storage  # FixedSizeListArray; `.values` is its whole child, slicing ignored
    child = storage.values
    buffer = child.buffers()[1]
    if buffer is None or len(chunk) == 0:
        return np.zeros((len(chunk), row_size), np_dtype)
    start = (child.offset + storage.offset * row_size)
    flat = np.frombuffer(buffer, dtype=np_dtype)[start:start + len(chunk) * row_size]
    return flat.reshape(len(chunk), row_size)


def _nulls(column: pa.ChunkedArray) -> np.ndarray | None:
    if column.null_count == 0:
        return None
    return column.is_null().to_numpy(zero_copy_only=False)


def tensor_from_column(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    """A fixed-shape tensor column -> (N, *shape) tensor; null rows are zeros."""
    column = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
    type_ = column.type
    if not _is_tensor(type_) or type_.value_type not in _VIEWS:
        raise ValueError(f"expected a fixed-shape float32/float16/uint16 tensor column, got {type_}")
    shape = tuple(type_.shape)
    np_dtype, torch_dtype = _VIEWS[type_.value_type]
    views = [_chunk_rows(chunk, prod(shape), np_dtype) for chunk in column.chunks]
    rows = views[0] if len(views) == 1 else np.concatenate(views) if views else np.zeros((0, prod(shape)), np_dtype)
    nulls = _nulls(column)
    if nulls is not None:
        rows = rows if rows.flags.owndata else rows.copy()  # the one copy, made only when needed
        rows[nulls] = 0
    tensor = _shared(rows.reshape(len(rows), *shape))
    return tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor


def _shared(array: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy`, also for Arrow's read-only buffers (the tensor shares them; see the
    module docstring) without torch's warning about them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def latents_to_tensors(
    data: pa.Table | pa.RecordBatch, *, columns: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor column (N, *shape) and numeric / bool column (N,) of a latent batch as tensors.

    `columns` picks a subset (default: all that hold numbers; string columns such as `key` and
    `caption` are left out). Null tensor rows (an absent modality) are zeros; `has_<modality>`
    says which rows are real.

        >>> from pipelines.schema import latent_sample_schema
        >>> schema = latent_sample_schema(latent_shapes={"text": (2, 3)}, pooled_dims={}, dtype="float32")
        >>> table = schema.empty_table()
        >>> {name: tuple(t.shape) for name, t in latents_to_tensors(table, columns=["text_latent"]).items()}
        {'text_latent': (0, 2, 3)}
    """
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    names = list(columns) if columns is not None else [
        f.name for f in table.schema if _is_tensor(f.type) or f.type in _SCALARS
    ]
    out = {}
    for name in names:
        column = table.column(name)
        if _is_tensor(column.type):
            out[name] = tensor_from_column(column)
        elif column.type in _SCALARS:
            out[name] = _shared(column.to_numpy(zero_copy_only=False)).to(_SCALARS[column.type])
        else:
            raise ValueError(f"column {name!r} of type {column.type} holds no numbers")
    return out


def read_latents(
    paths: Sequence[str], storage: st.StorageConfig, *, columns: Sequence[str] | None = None
) -> pa.Table:
    """Latent parts (local or s3://) read with plain pyarrow into one Table, its layout checked.

    Every part must have the same layout (dtype, shapes, codec hash); the table keeps it in its
    schema metadata. `columns` reads only those columns.
    """
    if not paths:
        raise ValueError("no latent parts to read")
    tables, layout = [], None
    for path in paths:
        with st.open_input(path, storage) as f:
            table = pq.read_table(f, columns=list(columns) if columns is not None else None)
        mine = latent_layout(table.schema)
        if layout is not None and mine != layout:
            raise ValueError(f"{path} has latent layout {mine}, but earlier parts have {layout}")
        layout = mine
        tables.append(table)
    return pa.concat_tables(tables)
