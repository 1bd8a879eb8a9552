"""The part toolkit (`pipelines.parts`, `pipelines.rows`): de-duplication of retried writes, locally
and on S3 (each key ends in exactly one row across kept and rejected parts, whatever the parts'
order and names), the kept / rejected sink, the input index and the part reader."""

import numpy as np
import pyarrow as pa
import pytest

from omniflow import storage as st
from pipelines.parts import (
    Deduplicated,
    KeptRejectedSink,
    committed_parts,
    deduplicate_parts,
    index_parts,
    read_part,
    read_parts,
)
from pipelines.rows import dropped_rows, rejects, split_rejected, with_rejects
from pipelines.schema import DROPPED_SAMPLE

TENSOR = pa.fixed_shape_tensor(pa.float32(), [2, 2])


def _rows(keys: list[str], value: int = 0, *, null_tensor: bool = False) -> pa.Table:
    """Kept rows with a tensor column (one null tensor when asked), as a latents part holds them."""
    n = len(keys)
    values = np.arange(n * 4, dtype=np.float32).reshape(n, 4) + value
    lists = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 4, mask=pa.array([null_tensor] + [False] * (n - 1)))
    return pa.table({"key": keys, "value": [value] * n, "latent": pa.ExtensionArray.from_storage(TENSOR, lists)})


def _rejects(keys: list[str], reason: str = "failed") -> pa.Table:
    return pa.table({"key": keys, "reason": [reason] * len(keys)})


def _write(root: str, storage: st.StorageConfig, kind: str, parts: dict[str, pa.Table]) -> None:
    for name, table in parts.items():
        st.write_parquet_atomic(table, st.join(root, kind, name), storage)


def _dedupe(root: str, storage: st.StorageConfig) -> Deduplicated:
    return deduplicate_parts(committed_parts(st.join(root, "kept"), storage),
                             committed_parts(st.join(root, "rejects"), storage), storage=storage)


def _rows_of(root: str, storage: st.StorageConfig, kind: str) -> list[dict]:
    table = read_parts(committed_parts(st.join(root, kind), storage), storage)
    return sorted(table.to_pylist(), key=lambda r: r["key"]) if table is not None else []


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[str, st.StorageConfig]:
    if request.param == "local":
        return str(tmp_path / "out"), st.StorageConfig()
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/out", server.storage


def test_a_retried_write_leaves_each_key_once_and_a_rerun_changes_nothing(where):
    root, storage = where
    first = _rows(["k0", "k1", "k2", "k3"], null_tensor=True)
    _write(root, storage, "kept", {"part-a.parquet": first, "part-b.parquet": first,  # one task, committed twice
                                   "part-c.parquet": _rows(["k4", "k4"])})  # a key twice in one part
    # the first attempt rejected k2 (then its retry completed it); k5 is a reject written twice
    _write(root, storage, "rejects", {"part-r.parquet": _rejects(["k2", "k5"]), "part-s.parquet": _rejects(["k5"])})

    assert _dedupe(root, storage) == Deduplicated(kept=5, rejected=2)
    kept, rejects = _rows_of(root, storage, "kept"), _rows_of(root, storage, "rejects")
    assert [r["key"] for r in kept] == ["k0", "k1", "k2", "k3", "k4"] and [r["key"] for r in rejects] == ["k5"]
    assert kept[0]["latent"] is None and kept[1]["latent"] == [4.0, 5.0, 6.0, 7.0]
    # parts left empty are gone; one rejects part and two kept parts remain
    assert len(committed_parts(st.join(root, "kept"), storage)) == 2
    assert len(committed_parts(st.join(root, "rejects"), storage)) == 1

    files = {p: st.read_bytes(p, storage) for kind in ("kept", "rejects") for p in committed_parts(st.join(root, kind), storage)}
    assert _dedupe(root, storage) == Deduplicated()
    assert {p: st.read_bytes(p, storage) for p in files} == files


def test_which_copy_stays_depends_on_the_rows_only(tmp_path):
    """Copies that differ (a retry is not always bit-identical): the same one stays whatever the
    parts are called and in whatever order they are listed; it is the one of smallest digest."""
    from pipelines.parts import _row_digests

    storage, outcomes = st.StorageConfig(), set()
    for names in (("part-a", "part-b"), ("part-b", "part-a")):
        for listed in (list, reversed):
            root = str(tmp_path / f"{names[0]}-{listed.__name__}")
            _write(root, storage, "kept", {f"{names[0]}.parquet": _rows(["x", "y"], value=1),
                                           f"{names[1]}.parquet": _rows(["x"], value=2)})
            _write(root, storage, "rejects", {f"{names[0]}.parquet": _rejects(["z"], "first"),
                                              f"{names[1]}.parquet": _rejects(["z", "x"], "second")})
            kept = list(listed(committed_parts(st.join(root, "kept"), storage)))
            rejected = list(listed(committed_parts(st.join(root, "rejects"), storage)))
            assert deduplicate_parts(kept, rejected, storage=storage) == Deduplicated(kept=1, rejected=2)
            kept_rows = [(r["key"], r["value"]) for r in _rows_of(root, storage, "kept")]
            outcomes.add((tuple(kept_rows), tuple((r["key"], r["reason"]) for r in _rows_of(root, storage, "rejects"))))
    assert len(outcomes) == 1
    (kept_rows, rejected_rows), = outcomes
    x = min((_row_digests(_rows(["x"], value=v))[0], v) for v in (1, 2))[1]
    z = min((_row_digests(_rejects(["z"], r))[0], r) for r in ("first", "second"))[1]
    assert kept_rows == (("x", x), ("y", 1)) and rejected_rows == (("z", z),)


def test_digests_name_the_values_not_the_column_order():
    from pipelines.parts import _row_digests

    table = _rows(["x", "y"], value=1)
    digests = _row_digests(table)
    assert _row_digests(table.select(["latent", "value", "key"])) == digests
    assert len(set(digests + _row_digests(_rows(["x", "y"], value=2)))) == 4


# ---- the kept / rejected sink, the index and the part reader -----------------------------------


def _in_flight(keys: list[str], reasons: list[str | None], stage: str | None = "decode") -> pa.Table:
    """Rows as a stage hands them to a writer: alive (reason null) or rejected with a reason."""
    return pa.table({"key": keys, "source": ["s"] * len(keys), "sample_id": keys, "x": list(range(len(keys))),
                     "reject_stage": [stage if r else None for r in reasons], "reject_reason": reasons})


def test_rows_helpers_turn_rejected_rows_into_dropped_rows():
    table = _in_flight(["a", "b", "c"], [None, "bad bytes", None])
    stage, reason = rejects(table)
    assert stage == [None, "decode", None] and reason == [None, "bad bytes", None]
    reason[2], stage[2] = "no audio", "encode"
    table = with_rejects(table, stage, reason)
    live, rejected = split_rejected(table)
    assert live.column("key").to_pylist() == ["a"] and rejected.column("key").to_pylist() == ["b", "c"]
    dropped = dropped_rows(table)
    assert dropped.schema == DROPPED_SAMPLE
    assert [(r["key"], r["status"], r["stage"], r["reason"]) for r in dropped.to_pylist()] == [
        ("b", "rejected", "decode", "bad bytes"), ("c", "rejected", "encode", "no audio")]
    assert dropped_rows(table, stage="synthesize").column("stage").to_pylist() == ["synthesize"] * 2
    assert rejects(pa.table({"key": ["a"]})) == ([None], [None])  # no reject columns: all alive


def test_kept_rejected_sink_splits_names_done_keys_and_deduplicates(tmp_path):
    storage = st.StorageConfig()
    schema = pa.schema([pa.field("key", pa.string()), pa.field("source", pa.string()), pa.field("x", pa.int64())])
    sink = KeptRejectedSink(str(tmp_path), "kept", schema, storage, rows_per_part=2)
    batch = _in_flight(["a", "b", "c", "d", "e"], [None, "bad", None, None, None])
    written = sink.write([batch], ctx=None)
    parts = sink.parts()
    assert sorted(written) == sorted(parts["kept"] + parts["rejects"])
    assert len(parts["kept"]) == 2 and len(parts["rejects"]) == 1  # 4 live rows in parts of about 2
    assert sink.done_keys() == {"a", "b", "c", "d", "e"}
    assert read_parts(parts["kept"], storage).schema == schema
    # A retried task that completed "b" and wrote "a" again: one copy of each key stays, kept over rejected.
    sink.write([_in_flight(["a", "b"], [None, None])], ctx=None)
    assert sink.deduplicate() == Deduplicated(kept=1, rejected=1)
    kept = read_parts(sink.parts()["kept"], storage).column("key").to_pylist()
    assert sorted(kept) == ["a", "b", "c", "d", "e"] and sink.parts()["rejects"] == []


def test_index_and_read_part_skip_what_is_done(tmp_path):
    storage = st.StorageConfig()
    first, second = str(tmp_path / "part-1.parquet"), str(tmp_path / "part-2.parquet")
    st.write_parquet_atomic(pa.table({"key": ["a", "b", "c"], "source": ["s", "s", "t"], "x": [1, 2, 3]}), first, storage)
    st.write_parquet_atomic(pa.table({"key": ["c", "d"], "source": ["t", "t"], "x": [3, 4]}), second, storage)
    index = index_parts([first, second], storage)
    assert index.rows.column("key").to_pylist() == ["a", "b", "c", "d"] and index.repeated_keys == 1
    assert index.count_by_source() == {"s": 2, "t": 2}
    reads = index.reads(skip={"a", "c", "d"})
    assert reads == [{"path": first, "skip": ["a", "c"]}]  # the second part has nothing left
    blocks = list(read_part(first, storage, columns=["key", "x", "absent"], skip=["a"], rows_per_block=1))
    assert [b.to_pylist() for b in blocks] == [[{"key": "b", "x": 2}], [{"key": "c", "x": 3}]]
