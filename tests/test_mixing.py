"""Mixing latent streams into batches: shares, task choice by presence, resume position."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from omniflow.modality import Modality
from pipelines.mixing import (
    DatasetSpec,
    MixedBatches,
    Stream,
    presence,
    stream_weights,
    task_choice,
    to_batch,
)
from pipelines.schema import LATENT_STORAGE, latent_column, latent_sample_schema, tensor_column

I, T, A = Modality.IMAGE, Modality.TEXT, Modality.AUDIO


def _table(source: str, n: int, media: set[str], start: int = 0, synthetic_audio: bool = False) -> pa.Table:
    shapes = {"image": (2, 2), "text": (3,), "audio": (2,)}
    schema = latent_sample_schema(latent_shapes=shapes, pooled_dims={}, dtype="float32")
    cols = {"key": [f"{source}/{start + i}" for i in range(n)], "source": [source] * n,
            "sample_id": [str(start + i) for i in range(n)], "caption": ["c"] * n,
            "source_weight": pa.array([1.0] * n, pa.float32()), "image_synthetic": [False] * n,
            "caption_synthetic": [False] * n, "audio_synthetic": [synthetic_audio] * n,
            "schema_version": pa.array([1] * n, pa.int16())}
    for m, shape in shapes.items():
        valid = np.full(n, m in media)
        values = np.full((n, *shape), start, np.float32) + np.arange(n, dtype=np.float32).reshape(n, *[1] * len(shape))
        cols[f"has_{m}"] = valid
        cols[latent_column(m)] = tensor_column(latent_column(m), values, LATENT_STORAGE["float32"], valid)
    return pa.Table.from_arrays([pa.table(cols).column(f.name) for f in schema], schema=schema)


def _stream(name, tables, weight=1.0, tasks=None, synthetic=True):
    return Stream(name=name, weight=weight, tasks=tasks or {"t2i": 1.0}, synthetic=synthetic, open=lambda: iter(tables))


def test_task_choice_respects_presence_and_weights():
    n = 20_000
    present = {I: np.ones(n, bool), T: np.ones(n, bool), A: np.arange(n) % 2 == 0}
    tasks = task_choice(present, {"t2i": 1.0, "t2a": 3.0}, np.random.default_rng(0))
    names = np.array([t.name for t in tasks])
    assert set(names[1::2]) == {"t2i"}  # no audio: only t2i is possible
    assert abs((names[0::2] == "t2a").mean() - 0.75) < 0.02
    none = task_choice({I: np.zeros(3, bool), T: np.ones(3, bool), A: np.zeros(3, bool)}, {"t2i": 1.0},
                       np.random.default_rng(0))
    assert none == [None, None, None]


def test_synthetic_modalities_can_count_as_absent():
    table = _table("s", 4, {"image", "text", "audio"}, synthetic_audio=True)
    assert presence(table, synthetic=True)[A].all()
    assert not presence(table, synthetic=False)[A].any()


def test_mixing_shares_follow_weights_and_epochs_wrap():
    streams = [
        _stream("a", [_table("a", 10, {"image", "text"})], weight=3.0),
        _stream("b", [_table("b", 7, {"image", "text"}, start=100)], weight=1.0),
    ]
    mix = MixedBatches(streams, batch_size=16, seed=0, rank=0)
    sources = []
    for step in range(200):
        table, tasks = mix.next_batch(step)
        assert table.num_rows == len(tasks) == 16
        sources += table.column("source").to_pylist()
    assert abs(sources.count("a") / len(sources) - 0.75) < 0.02
    assert mix.readers["a"].epoch > 100  # 10-row epochs, about 2400 rows read


def test_rows_without_a_possible_task_are_skipped_and_counted():
    stream = _stream("a", [_table("a", 4, {"image", "text"}), _table("a", 4, {"audio"}, start=10)])
    mix = MixedBatches([stream], batch_size=4, seed=0, rank=0)
    table, _ = mix.next_batch(0)
    table2, _ = mix.next_batch(1)
    assert table.column("sample_id").to_pylist() == ["0", "1", "2", "3"]
    assert table2.column("sample_id").to_pylist() == ["0", "1", "2", "3"]  # audio-only rows skipped, next epoch
    assert mix.skipped_rows == 4


@pytest.mark.parametrize("cache_bytes", [0, 10**9])
def test_resume_from_position_continues_the_stream(cache_bytes):
    tables = [_table("a", 5, {"image", "text"}, start=10 * i) for i in range(3)]
    opened = []

    def open_():
        opened.append(1)
        return iter(tables)

    def make(position=None):
        stream = Stream(name="a", weight=1.0, tasks={"t2i": 1.0}, synthetic=True, open=open_)
        return MixedBatches([stream], batch_size=4, seed=0, rank=0, position=position, cache_bytes=cache_bytes)

    full = make()
    ids = [full.next_batch(s)[0].column("key").to_pylist() for s in range(8)]
    first = make()
    for s in range(3):
        first.next_batch(s)
    resumed = make(first.position())
    assert [resumed.next_batch(s)[0].column("key").to_pylist() for s in range(3, 8)] == ids[3:]
    if cache_bytes:
        assert len(opened) == 3  # one pass per run: later epochs replay the cached epoch


def test_to_batch_and_stream_weights():
    table = _table("a", 3, {"image", "text"})
    batch = to_batch(table, [None] * 3)
    assert batch.latents["image"].shape == (3, 2, 2) and torch.all(batch.latents["audio"] == 0)
    specs = [DatasetSpec(name="x", path="p", weight=3, tasks={"t2i": 1}),
             DatasetSpec(name="y", path="q", weight=1, tasks={"t2a": 1})]
    weights = stream_weights(specs, {"x": {"s1": 1.0, "s2": 3.0}, "y": {"s3": 5.0}})
    assert weights == pytest.approx({"x.s1": 0.1875, "x.s2": 0.5625, "y.s3": 0.25})
    with pytest.raises(ValueError, match="unknown task"):
        DatasetSpec(name="x", path="p", tasks={"t2video": 1})
