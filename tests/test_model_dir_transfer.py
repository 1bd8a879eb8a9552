"""`publish_model_dir` / `fetch_model_dir`: a directory goes to a local path or a bucket whole, and
comes back as a local directory, fetched again when the prefix was published again."""

from pathlib import Path

from omniflow import storage as st
from omniflow.model_dir import MODEL_INDEX, fetch_model_dir, publish_model_dir


def _model(root: Path, weights: bytes) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "weights.bin").write_bytes(weights)
    (root / MODEL_INDEX).write_text("{}")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_publish_to_s3_and_fetch(tmp_path, s3_server):
    storage = s3_server.storage
    dest = f"s3://{s3_server.new_bucket()}/models/m"
    st.write_bytes_atomic(f"{dest}/stale.txt", b"from an older model", storage)
    first = _model(tmp_path / "a", b"one")
    publish_model_dir(first, dest, storage)
    assert not st.exists(f"{dest}/stale.txt", storage)  # replaced whole
    fetched = fetch_model_dir(dest, storage)
    assert _files(fetched) == _files(first)
    assert fetch_model_dir(dest, storage) == fetched  # once per machine
    publish_model_dir(_model(tmp_path / "b", b"two!"), dest, storage)
    again = fetch_model_dir(dest, storage)
    assert again != fetched and (again / "transformer" / "weights.bin").read_bytes() == b"two!"


def test_publish_locally_swaps_the_directory_in(tmp_path):
    dest = tmp_path / "published"
    publish_model_dir(_model(tmp_path / "a", b"one"), str(dest))
    (dest / "extra").write_text("left by hand")
    publish_model_dir(_model(tmp_path / "b", b"two"), str(dest))
    assert _files(dest) == _files(tmp_path / "b")
    assert fetch_model_dir(str(dest)) == dest
