"""Sources: every kind read from local disk and from S3 (a moto server on loopback), exact counts,
stable unique keys, damaged shards as one rejected row, `read_sources` on a local Ray cluster."""

import io
import json
import os
import tarfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from omniflow import storage as st
from pipelines.schema import SCORED_SAMPLE
from pipelines.sources import (
    READ_SAMPLE,
    FolderSource,
    ParquetSource,
    WebDatasetSource,
    list_shards,
    parse_source,
    read_shard,
    read_sources,
)
from shapesworld.defects import make_records
from shapesworld.source import ShapesWorldSource

LOCAL = st.StorageConfig()


@pytest.fixture(scope="module")
def records():
    return make_records(10, seed=3)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(root directory, storage) on local disk or in the session's S3 bucket."""
    if request.param == "local":
        return str(tmp_path), LOCAL
    server = request.getfixturevalue("s3_server")
    return server.url(uuid.uuid4().hex), server.storage


def read_all(source, storage) -> pa.Table:
    tables = [read_shard(source, shard, storage) for shard in list_shards(source, storage)]
    for table in tables:
        assert table.schema == READ_SAMPLE
    return pa.concat_tables(tables)


# ---------------------------------------------------------------- writers of test inputs


def write_parquet(root, rows, storage, *, files=2, **columns) -> str:
    """rows split over `files` Parquet files under root/parquet/."""
    directory = st.join(root, "parquet")
    for i in range(files):
        part = rows[i::files]
        table = pa.table({name: [fn(r) for r in part] for name, fn in columns.items()})
        st.write_parquet_atomic(table, st.join(directory, f"part-{i}.parquet"), storage)
    return directory


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def img2dataset_members(rows, shard: int) -> list[tuple[str, bytes]]:
    members = []
    for i, r in enumerate(rows):
        key = f"{shard:05d}{i:04d}"
        meta = {"key": key, "caption": r["caption"], "status": "success", "width": 32, "height": 32}
        members += [
            (f"{key}.png", r["image"]),
            (f"{key}.txt", r["caption"].encode()),
            (f"{key}.json", json.dumps(meta).encode()),
            (f"{key}.wav", r["audio"]),
        ]
    return members


def write_folder(root, rows, storage) -> str:
    directory = st.join(root, "folder")
    for i, r in enumerate(rows):
        stem = st.join(directory, "a" if i % 2 else "b", f"s{i:02d}")
        st.write_bytes_atomic(stem + ".png", r["image"], storage)
        st.write_bytes_atomic(stem + ".txt", r["caption"].encode() + b"\n", storage)
        st.write_bytes_atomic(stem + ".wav", r["audio"], storage)
    st.write_bytes_atomic(st.join(directory, "only_image.jpg"), rows[0]["image"], storage)
    st.write_bytes_atomic(st.join(directory, "README.md"), b"not a sample", storage)
    st.write_bytes_atomic(st.join(directory, ".hidden.png"), b"editor junk", storage)
    return directory


# ---------------------------------------------------------------- storage


def test_storage_round_trip(where):
    root, storage = where
    st.write_bytes_atomic(st.join(root, "x", "a.txt"), b"hello", storage)
    st.write_bytes_atomic(st.join(root, "x", "deep", "b.txt"), b"world", storage)
    st.write_parquet_atomic(pa.table({"v": [1, 2]}), st.join(root, "x", "t.parquet"), storage)

    assert st.read_bytes(st.join(root, "x", "a.txt"), storage) == b"hello"
    assert st.exists(st.join(root, "x"), storage) and not st.exists(st.join(root, "nope"), storage)
    names = [p.rsplit("/", 1)[1] for p in st.list_files(st.join(root, "x"), storage)]
    assert names == ["a.txt", "b.txt", "t.parquet"]  # recursive, sorted by path
    assert [p.rsplit("/", 1)[1] for p in st.list_files(st.join(root, "x", "*.txt"), storage)] == [
        "a.txt"
    ]
    assert st.list_files(st.join(root, "nope"), storage) == []
    with st.open_input(st.join(root, "x", "t.parquet"), storage) as f:
        assert pq.read_table(f).column("v").to_pylist() == [1, 2]
    with pytest.raises(ValueError, match="read limit"):
        st.read_bytes(st.join(root, "x", "a.txt"), storage, max_bytes=3)

    # A write that fails part-way leaves nothing behind, temp file included.
    with pytest.raises(pa.ArrowException):
        st.write_parquet_atomic(
            pa.table({"v": [1]}), st.join(root, "x", "bad.parquet"), storage, compression="nope"
        )
    assert not st.exists(st.join(root, "x", "bad.parquet"), storage)
    if storage is LOCAL:
        assert sorted(os.listdir(os.path.join(root, "x"))) == ["a.txt", "deep", "t.parquet"]

    st.remove(st.join(root, "x"), storage)
    assert not st.exists(st.join(root, "x"), storage)


def test_storage_config_validates_endpoint():
    with pytest.raises(ValidationError, match="endpoint_url"):
        st.StorageConfig(endpoint_url="localhost:9000")


# ---------------------------------------------------------------- each source kind


def test_parquet_with_bytes_columns(where, records):
    root, storage = where
    path = write_parquet(
        root,
        records,
        storage,
        uid=lambda r: r["id"],
        img=lambda r: r["image"],
        text=lambda r: r["caption"],
        wav=lambda r: r["audio"],
    )
    source = ParquetSource(
        name="pq",
        path=path,
        id_column="uid",
        image_column="img",
        caption_column="text",
        audio_column="wav",
    )
    assert list_shards(source, storage) == ["part-0.parquet", "part-1.parquet"]
    table = read_all(source, storage)
    assert table.num_rows == len(records)
    assert table.column("key").to_pylist()[:2] == ["pq/part-0.parquet/0", "pq/part-0.parquet/1"]
    by_id = {r["id"]: r for r in records}
    for row in table.to_pylist():
        original = by_id[row["sample_id"]]
        assert (row["image"], row["caption"], row["audio"]) == (
            original["image"],
            original["caption"],
            original["audio"],
        )
        assert row["reject_stage"] is None
    assert read_all(source, storage).equals(table)  # stable across reads


def test_parquet_with_path_columns(where, records):
    root, storage = where
    for r in records[1:]:  # the first record's files are missing
        st.write_bytes_atomic(
            st.join(root, "parquet", "media", r["id"] + ".png"), r["image"], storage
        )
        st.write_bytes_atomic(
            st.join(root, "parquet", "media", r["id"] + ".wav"), r["audio"], storage
        )
    absolute = st.join(
        root, "parquet", "media", records[-1]["id"] + ".png"
    )  # relative paths and a full one
    path = write_parquet(
        root,
        records,
        storage,
        files=1,
        caption=lambda r: r["caption"],
        image=lambda r: absolute if r is records[-1] else f"media/{r['id']}.png",
        audio=lambda r: f"media/{r['id']}.wav",
    )
    source = ParquetSource(
        name="paths",
        path=st.join(path, "*.parquet"),
        image_is_path=True,
        audio_column="audio",
        audio_is_path=True,
    )
    rows = read_all(source, storage).to_pylist()
    assert len(rows) == len(records)
    assert [r["sample_id"] for r in rows[:2]] == ["part-0.parquet/0", "part-0.parquet/1"]
    assert rows[0]["reject_stage"] == "read" and "not found" in rows[0]["reject_reason"]
    assert rows[0]["image"] is None and rows[0]["caption"] == records[0]["caption"]
    for row, original in zip(rows[1:], records[1:], strict=True):
        assert row["reject_stage"] is None
        assert (row["image"], row["audio"]) == (original["image"], original["audio"])


def test_parquet_with_urls_and_hugging_face_columns(tmp_path, records):
    """Media given as http URLs (a loopback server) or as `struct<bytes, path>` cells."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    (tmp_path / "a.png").write_bytes(records[0]["image"])
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        pq.write_table(
            pa.table({"image": [f"{base}/a.png", f"{base}/missing.png"]}), tmp_path / "urls.parquet"
        )
        source = ParquetSource(
            name="u", path=str(tmp_path / "urls.parquet"), caption_column=None, image_is_path=True
        )
        rows = read_shard(source, "urls.parquet", LOCAL).to_pylist()
    finally:
        server.shutdown()
    assert rows[0]["image"] == records[0]["image"] and rows[0]["reject_stage"] is None
    assert rows[1]["reject_stage"] == "read" and "not found" in rows[1]["reject_reason"]

    cells = [{"bytes": records[1]["image"], "path": None}, {"bytes": None, "path": "a.png"}]
    pq.write_table(pa.table({"image": cells}), tmp_path / "hf.parquet")
    rows = read_shard(
        ParquetSource(name="hf", path=str(tmp_path / "hf.parquet"), caption_column=None),
        "hf.parquet",
        LOCAL,
    ).to_pylist()
    assert [r["image"] for r in rows] == [records[1]["image"], records[0]["image"]]


def test_webdataset(where, records):
    root, storage = where
    for shard, part in enumerate((records[:6], records[6:])):
        st.write_bytes_atomic(
            st.join(root, "wds", f"{shard:05d}.tar"),
            tar_bytes(img2dataset_members(part, shard)),
            storage,
        )
    source = WebDatasetSource(name="wds", path=st.join(root, "wds", "*.tar"))
    assert list_shards(source, storage) == ["00000.tar", "00001.tar"]
    table = read_all(source, storage)
    assert table.column("sample_id").to_pylist()[:2] == ["000000000", "000000001"]
    assert table.column("key").to_pylist()[-1] == "wds/00001.tar/3"
    assert table.column("image").to_pylist() == [r["image"] for r in records]
    assert table.column("caption").to_pylist() == [r["caption"] for r in records]
    assert table.column("audio").to_pylist() == [r["audio"] for r in records]
    assert table.column("reject_stage").null_count == table.num_rows


def test_folder(where, records):
    root, storage = where
    source = FolderSource(
        name="dir", path=write_folder(root, records[:5], storage), samples_per_shard=4
    )
    assert list_shards(source, storage) == ["part-00000", "part-00001"]
    rows = read_all(source, storage).to_pylist()
    assert [r["sample_id"] for r in rows] == [
        "a/s01",
        "a/s03",
        "b/s00",
        "b/s02",
        "b/s04",
        "only_image",
    ]
    assert [r["key"] for r in rows][3:5] == ["dir/part-00000/3", "dir/part-00001/0"]
    assert rows[2]["image"] == records[0]["image"] and rows[2]["caption"] == records[0]["caption"]
    assert rows[2]["audio"] == records[0]["audio"]
    assert (
        rows[-1]["caption"] is None
        and rows[-1]["audio"] is None
        and rows[-1]["image"] == records[0]["image"]
    )


def test_shapesworld_is_make_records_in_shards():
    source = ShapesWorldSource(name="toy", samples=10, seed=1, defect_rate=0.5, samples_per_shard=4)
    assert list_shards(source, LOCAL) == ["part-00000", "part-00001", "part-00002"]
    table = read_all(source, LOCAL)
    truth = make_records(10, seed=1, defect_rate=0.5)
    assert table.column("sample_id").to_pylist() == [r["id"] for r in truth]
    assert table.column("image").to_pylist() == [r["image"] for r in truth]
    assert table.column("key").to_pylist()[4] == "toy/part-00001/0"


# ---------------------------------------------------------------- damaged input


def test_truncated_tar_keeps_whole_samples_and_rejects_the_rest(where, records):
    root, storage = where
    whole = tar_bytes(img2dataset_members(records, 0))
    st.write_bytes_atomic(st.join(root, "cut.tar"), whole[: len(whole) // 2], storage)
    rows = read_shard(
        WebDatasetSource(name="w", path=st.join(root, "cut.tar")), "cut.tar", storage
    ).to_pylist()
    good, bad = rows[:-1], rows[-1]
    assert 0 < len(good) < len(records)
    assert [r["image"] for r in good] == [r["image"] for r in records[: len(good)]]
    assert all(r["reject_stage"] is None for r in good)
    assert bad["key"] == f"w/cut.tar/{len(good)}" and bad["sample_id"] == "cut.tar"
    assert bad["reject_stage"] == "read" and f"after {len(good)} samples" in bad["reject_reason"]


def test_tar_with_garbage_inside(where, records):
    root, storage = where
    head = tar_bytes(img2dataset_members(records[:2], 0))
    head = head.rstrip(b"\0")  # drop the end-of-archive blocks, then pad the last member back
    head += b"\0" * (-len(head) % 512)
    data = head + os.urandom(4096) + tar_bytes(img2dataset_members(records[2:4], 1))
    st.write_bytes_atomic(st.join(root, "junk.tar"), data, storage)
    rows = read_shard(WebDatasetSource(name="w", path=root), "junk.tar", storage).to_pylist()
    assert len(rows) == 2  # the first sample, then the damage (the second may have lost members)
    assert rows[0]["image"] == records[0]["image"]
    assert rows[1]["reject_stage"] == "read" and "unreadable header" in rows[1]["reject_reason"]


@pytest.mark.parametrize(
    "make_source,content,reason",
    [
        (lambda p: WebDatasetSource(name="s", path=p), b"definitely not a tar" * 100, "ReadError"),
        (lambda p: WebDatasetSource(name="s", path=p), b"", "ReadError"),
        (lambda p: ParquetSource(name="s", path=p), b"PAR1 garbage" * 50, "ArrowInvalid"),
        (
            lambda p: ParquetSource(name="s", path=p, caption_column="text"),
            None,
            "no column 'text'",
        ),
        (
            lambda p: ParquetSource(name="s", path=p, caption_column=None, image_column="caption"),
            None,
            "holds strings",
        ),
    ],
    ids=["garbage-tar", "empty-tar", "garbage-parquet", "missing-column", "strings-not-bytes"],
)
def test_unreadable_shard_is_one_rejected_row(tmp_path, make_source, content, reason):
    path = tmp_path / "shard.bin"
    if content is None:
        pq.write_table(pa.table({"caption": ["a", "b"], "image": [b"x", b"y"]}), path)
    else:
        path.write_bytes(content)
    rows = read_shard(make_source(str(path)), "shard.bin", LOCAL).to_pylist()
    assert len(rows) == 1
    assert rows[0]["key"] == "s/shard.bin/0" and rows[0]["reject_stage"] == "read"
    assert reason in rows[0]["reject_reason"] and "from the start" in rows[0]["reject_reason"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValidationError, match="name"):
        parse_source({"type": "shapesworld", "name": "a/b"})
    with pytest.raises(ValidationError, match="type"):
        parse_source({"type": "csv", "name": "a", "path": "x"})
    with pytest.raises(ValidationError, match="samples_per_shard"):
        parse_source({"type": "folder", "name": "a", "path": "x", "samples_per_shard": 0})
    with pytest.raises(ValidationError, match="at least one of image_column"):
        ParquetSource(name="a", path="x", image_column=None, caption_column=None)
    with pytest.raises(ValueError, match="no webdataset input"):
        list_shards(WebDatasetSource(name="a", path=str(tmp_path)), LOCAL)


# ---------------------------------------------------------------- Ray Data


def collect(ds) -> pa.Table:
    import ray

    return pa.concat_tables([t for t in ray.get(ds.to_arrow_refs()) if t.num_rows])


def test_read_sources_resumes_without_loss_or_duplicates(ray_cluster, s3_server, tmp_path, records):
    from pipelines.decode import Decode, DecodeConfig

    s3_root = s3_server.url(uuid.uuid4().hex)
    for shard, part in enumerate((records[:4], records[4:])):
        data = tar_bytes(img2dataset_members(part, shard))
        st.write_bytes_atomic(st.join(s3_root, f"{shard:05d}.tar"), data, s3_server.storage)
    st.write_bytes_atomic(st.join(s3_root, "00002.tar"), b"corrupt" * 200, s3_server.storage)
    sources = [
        WebDatasetSource(name="wds", path=s3_root),
        ParquetSource(
            name="pq",
            path=write_parquet(
                str(tmp_path),
                records,
                LOCAL,
                image=lambda r: r["image"],
                caption=lambda r: r["caption"],
            ),
        ),
        ShapesWorldSource(name="toy", samples=6, samples_per_shard=4),
    ]
    expected = len(records) + 1 + len(records) + 6  # the corrupt tar is one rejected row

    # A first run reads and decodes everything.
    decode = Decode.map_batches_kwargs(DecodeConfig(batch_size=8, concurrency=1))
    full = collect(read_sources(sources, s3_server.storage).map_batches(Decode, **decode))
    keys = full.column("key").to_pylist()
    assert full.schema == SCORED_SAMPLE and full.num_rows == expected == len(set(keys))
    stages = dict(zip(keys, full.column("reject_stage").to_pylist(), strict=True))
    assert [k for k, stage in stages.items() if stage is not None] == ["wds/00002.tar/0"]
    assert stages["wds/00002.tar/0"] == "read"  # clean records decode; the corrupt tar is "read"

    # A resumed run reads exactly what the first had not finished.
    done_keys = set(keys[::2])
    resumed = read_sources(
        sources, s3_server.storage, skip_keys=done_keys, skip_shards={"toy/part-00001"}
    )
    table = collect(resumed)
    rest = table.column("key").to_pylist()
    assert table.schema == READ_SAMPLE and len(rest) == len(set(rest))
    assert set(rest) == set(keys) - done_keys - {k for k in keys if k.startswith("toy/part-00001/")}
