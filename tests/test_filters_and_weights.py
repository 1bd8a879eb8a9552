"""Curation rules and source weights, on hand-made tables with known answers."""

import math

import numpy as np
import pyarrow as pa
import pytest

from pipelines.filters import FilterConfig, decide
from pipelines.near_duplicates import near_duplicate_mask
from pipelines.plots import score_histogram
from pipelines.schema import SCORED_SAMPLE, conform
from pipelines.weighting import WeightingConfig, source_quality, source_weights


def _table(rows):
    names = dict.fromkeys(k for r in rows for k in r)
    cols = {k: [r.get(k) for r in rows] for k in names}
    base = {"shard": ["s"] * len(rows), "schema_version": [1] * len(rows)}
    return conform(pa.table({**base, **cols}), SCORED_SAMPLE)


def _rows(n, source="a", **columns):
    rows = []
    for i in range(n):
        row = {"key": f"{source}/s/{i:03d}", "source": source, "sample_id": str(i), "caption": "a red circle",
               "content_hash": f"h{source}{i}"}
        row.update({k: (v[i] if isinstance(v, list) else v) for k, v in columns.items()})
        rows.append(row)
    return rows


def _status(decisions):
    return dict(zip(decisions.table.column("key").to_pylist(), decisions.table.column("status").to_pylist()))


def test_rejected_rows_keep_their_stage_and_reason():
    rows = _rows(3, clip_score=[0.5, 0.5, 0.5])
    rows[1].update(reject_stage="decode", reject_reason="image could not be decoded")
    d = decide(_table(rows), {})
    table = d.table.to_pylist()
    assert [r["status"] for r in table] == ["kept", "rejected", "kept"]
    assert table[1]["stage"] == "decode" and "decoded" in table[1]["reason"]


def test_absolute_thresholds_and_resolution():
    rows = _rows(4, clip_score=[0.1, 0.3, 0.5, 0.7], image_width=[512, 512, 100, 512], image_height=512)
    d = decide(_table(rows), {"a": FilterConfig(min_clip_score=0.2, min_image_side=256)})
    assert list(_status(d).values()) == ["filtered", "kept", "filtered", "kept"]
    reasons = d.table.column("stage").to_pylist()
    assert reasons[0] == "min_clip_score" and reasons[2] == "min_image_side"
    assert d.thresholds["a"]["min_clip_score"] == 0.2


def test_top_percent_is_per_source():
    rows = _rows(10, "a", clip_score=list(np.linspace(0, 0.9, 10))) + _rows(10, "b", clip_score=list(np.linspace(1, 1.9, 10)))
    d = decide(_table(rows), {"a": FilterConfig(clip_top_percent=30), "b": FilterConfig(clip_top_percent=50)})
    status = d.table.to_pylist()
    kept_a = [r for r in status if r["source"] == "a" and r["status"] == "kept"]
    kept_b = [r for r in status if r["source"] == "b" and r["status"] == "kept"]
    assert len(kept_a) == 3 and len(kept_b) == 5
    assert d.thresholds["a"]["clip_top_30%"] == pytest.approx(0.63, abs=1e-6)  # float32 scores


def test_exact_duplicates_keep_the_first_key_and_caption_rules():
    rows = _rows(4, content_hash=["x", "y", "x", "z"])
    rows[3]["caption"] = "hi"
    d = decide(_table(rows), {"a": FilterConfig(min_caption_chars=5)})
    table = d.table.to_pylist()
    assert [r["status"] for r in table] == ["kept", "kept", "filtered", "filtered"]
    assert table[2]["stage"] == "duplicate" and table[3]["stage"] == "min_caption_chars"


def test_counts_add_up():
    rows = _rows(50, clip_score=list(np.random.default_rng(0).random(50)), content_hash=[f"h{i % 40}" for i in range(50)])
    for r in rows[:5]:
        r.update(reject_stage="decode", reject_reason="bad")
    d = decide(_table(rows), {"a": FilterConfig(clip_top_percent=50)})
    statuses = d.table.column("status").to_pylist()
    assert len(statuses) == 50 and statuses.count("rejected") == 5
    assert statuses.count("kept") + statuses.count("filtered") == 45


def test_unknown_filter_field_is_rejected():
    with pytest.raises(ValueError, match="min_clip"):
        FilterConfig(min_clip=0.3)


def test_weights_follow_the_documented_rule():
    kept = {"a": 100, "b": 400, "c": 0}
    means = {"a": {"clip_score": 0.3}, "b": {"clip_score": 0.2}, "c": {}}
    q = source_quality(means, ("clip_score",))
    assert q["a"] == pytest.approx(1.0) and q["b"] == pytest.approx(-1.0) and q["c"] == 0.0
    cfg = WeightingConfig(size_exponent=0.5, quality_temperature=1.0)
    w = source_weights(kept, means, {"a": 2.0}, cfg)
    raw_a, raw_b = 2.0 * 100**0.5 * math.e, 400**0.5 / math.e
    assert w["a"] == pytest.approx(raw_a / (raw_a + raw_b)) and w["c"] == 0.0
    assert sum(w.values()) == pytest.approx(1.0)
    flat = source_weights(kept, means, {}, WeightingConfig(size_exponent=1.0, quality_temperature=0.0))
    assert flat["b"] == pytest.approx(0.8)


def test_histogram_is_a_png():
    png = score_histogram({"a": np.random.default_rng(0).random(100)}, {"a": {"min_clip_score": 0.5}}, "clip_score")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted_duplicates(n_groups, copies, dim=32, noise=0.05, seed=0):
    """`n_groups` random directions, each repeated `copies` times with small noise."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(n_groups, dim)))
    x = np.repeat(centres, copies, axis=0) + noise * rng.normal(size=(n_groups * copies, dim)) / np.sqrt(dim)
    return _unit(x), np.repeat(np.arange(n_groups), copies)


def test_near_duplicates_keep_the_best_of_each_group():
    x, group = _planted_duplicates(20, 3)
    quality = np.random.default_rng(1).uniform(size=len(x))
    duplicate = near_duplicate_mask(x, quality, threshold=0.95)
    for g in range(20):
        members = np.flatnonzero(group == g)
        survivors = members[~duplicate[members]]
        assert survivors.tolist() == [members[np.argmax(quality[members])]]


def test_near_duplicates_in_clusters_match_the_exact_rule():
    x, _group = _planted_duplicates(60, 4, seed=2)
    exact = near_duplicate_mask(x, threshold=0.95)
    clustered = near_duplicate_mask(x, threshold=0.95, cluster_size=40)
    assert exact.sum() == 60 * 3
    assert (clustered == exact).mean() >= 0.98


def test_near_duplicate_filter_in_decide():
    x, _ = _planted_duplicates(2, 2, dim=8)
    rows = _rows(5, clip_score=[0.3, 0.4, 0.5, 0.2, 0.9])
    for row, vector in zip(rows, [*x, None]):
        row["image_embedding"] = None if vector is None else vector.astype(np.float16).tolist()
    d = decide(_table(rows), {"a": FilterConfig(near_duplicate_cosine=0.95)})
    status = _status(d)
    # groups (0, 1) and (2, 3): the better CLIP score survives; a row without an embedding is kept
    assert [status[f"a/s/{i:03d}"] for i in range(5)] == ["filtered", "kept", "kept", "filtered", "kept"]
    stages = dict(zip(d.table.column("key").to_pylist(), d.table.column("stage").to_pylist()))
    assert stages["a/s/000"] == "near_duplicate"


def test_near_duplicate_filter_needs_embeddings():
    table = _table(_rows(2)).drop_columns(["image_embedding"])
    with pytest.raises(ValueError, match="image embeddings"):
        decide(table, {"a": FilterConfig(near_duplicate_cosine=0.9)})
