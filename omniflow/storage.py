"""One way to read and write files for every job: local paths and `s3://bucket/key` alike.

Everything goes through fsspec: `LocalFileSystem` for local paths, `s3fs.S3FileSystem` for
`s3://` (any S3-compatible endpoint, e.g. MinIO or moto), and `HTTPFileSystem` for reading
`http(s)://` media URLs. Paths keep their scheme (`s3://b/k`); local paths come back absolute.

Credentials never live in a config or a manifest: `StorageConfig` names the environment variables
that hold them (the standard AWS ones by default), and when those are unset the usual botocore
chain applies (shared profile, instance or pod role).

Writes are atomic. Locally a file is written under a hidden temp name in the same directory and
moved into place with `os.replace`, so a reader sees the old file or the whole new one. On S3 an
object only becomes visible when its single PUT or its multipart upload completes, so the final
key is written directly; the data is assembled in memory first so that a failure part-way never
completes an upload with half the data. Listings skip hidden names (`.x`), temp files included,
but for `LISTED_DOT_NAMES` (a sharded checkpoint's `.metadata`).

    >>> import tempfile
    >>> storage = StorageConfig()  # enough for local paths, and for S3 with the AWS env vars
    >>> out = join(tempfile.mkdtemp(), "out")
    >>> write_bytes_atomic(join(out, "a.txt"), b"hi", storage)
    >>> read_bytes(join(out, "a.txt"), storage), list_files(out, storage) == [join(out, "a.txt")]
    (b'hi', True)
"""

import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, field_validator

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")


class StorageConfig(BaseModel):
    """Where `s3://` paths live and how to authenticate; local paths need none of it.

    `endpoint_url` points at a non-AWS S3 service (`http://127.0.0.1:9000`); `anon` reads public
    buckets unsigned. The `*_env` fields name environment variables to take credentials from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    session_token_env: str = "AWS_SESSION_TOKEN"

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {value!r}")
        return value


def scheme(path: str) -> str:
    """ "s3", "http", "https" or "file" (a plain path)."""
    match = _SCHEME.match(path)
    return match.group(1).lower() if match else "file"


def has_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def filesystem(path: str, storage: StorageConfig) -> fsspec.AbstractFileSystem:
    """The filesystem that holds `path`. fsspec caches instances, so this is cheap to call."""
    kind = scheme(path)
    if kind == "file":
        return fsspec.filesystem("file")
    if kind == "s3":
        return fsspec.filesystem("s3", **_s3_options(storage))
    if kind in ("http", "https"):
        return fsspec.filesystem("http")
    raise ValueError(f"unsupported path scheme {kind!r} in {path!r}: use a local path or s3://")


def _s3_options(storage: StorageConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"anon": storage.anon, "use_listings_cache": False}
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.region:
        options["client_kwargs"] = {"region_name": storage.region}
    if not storage.anon:
        key = os.environ.get(storage.access_key_id_env)
        secret = os.environ.get(storage.secret_access_key_env)
        if bool(key) != bool(secret):
            raise ValueError(
                f"set both {storage.access_key_id_env} and {storage.secret_access_key_env}, "
                "or neither"
            )
        if key:
            options.update(
                key=key, secret=secret, token=os.environ.get(storage.session_token_env) or None
            )
    return options


def arrow_filesystem(path: str, storage: StorageConfig) -> "pa.fs.FileSystem | None":
    """Arrow's native filesystem for an s3:// `path` (what Ray Data and Ray Train read and write
    through, in C++ and in parallel), set from the same `storage` as every other access; None for a
    local path (Arrow's default)."""
    if scheme(path) != "s3":
        return None
    from urllib.parse import urlparse

    from pyarrow import fs as arrow_fs

    options = _s3_options(storage)
    kwargs: dict[str, Any] = {"anonymous": storage.anon}
    if "endpoint_url" in options:
        endpoint = urlparse(options["endpoint_url"])
        kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
    if storage.region:
        kwargs["region"] = storage.region
    if options.get("key"):
        kwargs.update(access_key=options["key"], secret_key=options["secret"], session_token=options["token"])
    return arrow_fs.S3FileSystem(**kwargs)


def arrow_path(path: str) -> str:
    """`path` as Arrow's filesystems name it (without `s3://`)."""
    return path.removeprefix("s3://") if scheme(path) == "s3" else absolute(path)


def _with_scheme(path: str, kind: str) -> str:
    """fsspec strips `s3://` from what it returns; put it back so paths stay usable."""
    return f"{kind}://{path}" if kind != "file" and not _SCHEME.match(path) else path


def absolute(path: str) -> str:
    """Local paths made absolute (so Ray workers with another cwd find them); URLs unchanged."""
    return path if scheme(path) != "file" else fsspec.filesystem("file")._strip_protocol(path)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URLs alike."""
    if scheme(base) == "file":
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


# Dot-names that are data, not temp files: the index of a sharded (torch.distributed.checkpoint)
# training checkpoint.
LISTED_DOT_NAMES = frozenset({".metadata"})


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") and part not in LISTED_DOT_NAMES for part in relative.split("/") if part)


def list_files(path_or_glob: str, storage: StorageConfig) -> list[str]:
    """Sorted paths under `path_or_glob`, hidden names (`.x`, temp files) left out.

    A glob returns every match (files and directories, one level per `*`, any depth for `**`); a
    directory returns every file beneath it, recursively; a file returns itself; a path that does
    not exist returns [].
    """
    fs = filesystem(path_or_glob, storage)
    if has_glob(path_or_glob):
        found = fs.glob(path_or_glob)
    elif fs.isdir(path_or_glob):
        found = fs.find(path_or_glob)
    else:
        return [absolute(path_or_glob)] if fs.exists(path_or_glob) else []
    root = _root(fs, path_or_glob, is_dir=True)
    kept = [p for p in found if p.rstrip("/") != root and not _hidden(posixpath.relpath(p, root))]
    return sorted(_with_scheme(p, scheme(path_or_glob)) for p in kept)


def glob_root(path_or_glob: str, storage: StorageConfig) -> str:
    """The directory that `list_files(path_or_glob)` results are relative to (with its scheme):
    the part of a glob before its first wildcard, a directory itself, or a file's directory."""
    fs = filesystem(path_or_glob, storage)
    is_dir = has_glob(path_or_glob) or fs.isdir(path_or_glob)
    return _with_scheme(_root(fs, path_or_glob, is_dir=is_dir), scheme(path_or_glob))


def _root(fs: fsspec.AbstractFileSystem, path_or_glob: str, *, is_dir: bool) -> str:
    stripped = fs._strip_protocol(path_or_glob).rstrip("/")
    if has_glob(stripped):
        parts = stripped.split("/")
        first_wild = next(i for i, part in enumerate(parts) if has_glob(part))
        return "/".join(parts[:first_wild]) or "/"
    return stripped if is_dir else posixpath.dirname(stripped)


def relative_to(path: str, root: str) -> str:
    """`path` relative to `root` (both as `list_files` and `glob_root` give them), `/`-separated."""
    return posixpath.relpath(path.split("://", 1)[-1], root.split("://", 1)[-1])


def exists(path: str, storage: StorageConfig) -> bool:
    """Whether a file or a directory (an S3 prefix with objects under it) is at `path`."""
    return filesystem(path, storage).exists(path)


@contextmanager
def open_input(path: str, storage: StorageConfig) -> Iterator[IO[bytes]]:
    """A seekable binary file to read `path` from (S3 reads ahead in blocks)."""
    with filesystem(path, storage).open(path, "rb") as f:
        yield f


def read_bytes(path: str, storage: StorageConfig, *, max_bytes: int | None = None) -> bytes:
    """The whole file; with `max_bytes`, a `ValueError` rather than a larger file in memory."""
    fs = filesystem(path, storage)
    if max_bytes is not None:
        size = fs.size(path)  # None when an HTTP server does not say; then read it all
        if size is not None and size > max_bytes:
            raise ValueError(f"file is {size:,} bytes, over the {max_bytes:,}-byte read limit")
    return fs.cat_file(path)


def read_many(
    paths: Sequence[str], storage: StorageConfig, *, max_bytes: int | None = None, threads: int = 16
) -> list[bytes | Exception]:
    """Each file's bytes, or the error that reading it raised: a missing, unreadable or oversized
    file is returned as its `OSError` / `ValueError` (or HTTP error), so that it becomes one
    rejected sample, not a failed shard. Other errors (no credentials, say) still raise.

    Reads run on a few threads because S3 and HTTP reads are latency-bound.
    """
    errors = _per_file_errors()

    def one(path: str) -> bytes | Exception:
        try:
            return read_bytes(path, storage, max_bytes=max_bytes)
        except errors as err:
            return err

    if len(paths) <= 1 or all(scheme(p) == "file" for p in paths):
        return [one(p) for p in paths]
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return list(pool.map(one, paths))


def _per_file_errors() -> tuple[type[Exception], ...]:
    """What a read of one bad file raises: s3fs turns S3 errors into `OSError`s; fsspec's HTTP
    backend raises aiohttp's errors for statuses other than 404."""
    import aiohttp

    return (OSError, ValueError, aiohttp.ClientError)


def write_bytes_atomic(path: str, data: bytes, storage: StorageConfig) -> None:
    """Write `data` to `path` so that readers see either no file (or the old one) or all of it."""
    _write_atomic(path, storage, lambda f: f.write(data), lambda: data)


def write_parquet_atomic(
    table: pa.Table, path: str, storage: StorageConfig, **write_options: Any
) -> None:
    """`pyarrow.parquet.write_table(table, ...)` with the atomicity of `write_bytes_atomic`."""

    def to_bytes() -> bytes:
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, **write_options)
        return buffer.getvalue().to_pybytes()

    _write_atomic(path, storage, lambda f: pq.write_table(table, f, **write_options), to_bytes)


def _write_atomic(
    path: str,
    storage: StorageConfig,
    write_to: Callable[[IO[bytes]], Any],
    as_bytes: Callable[[], bytes],
) -> None:
    kind = scheme(path)
    if kind == "s3":
        # A PUT (or a completed multipart upload) is all-or-nothing, so no temp key is needed.
        filesystem(path, storage).pipe_file(path, as_bytes())
        return
    if kind != "file":
        raise ValueError(f"cannot write to {path!r}: only local paths and s3:// are writable")
    target = absolute(path)
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as f:
            write_to(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def remove(path: str, storage: StorageConfig) -> None:
    """Remove a file, or a directory / S3 prefix with everything under it; absent is fine."""
    fs = filesystem(path, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def download_dir(path: str, local: str | os.PathLike, storage: StorageConfig) -> str:
    """Copy every file under directory `path` (local or s3://) into `local`, keeping relative paths."""
    files = list_files(path, storage)
    if not files:
        raise FileNotFoundError(f"no files under {path}")
    root = glob_root(path, storage)
    targets = [os.path.join(local, relative_to(remote, root)) for remote in files]
    for directory in {os.path.dirname(t) for t in targets}:
        os.makedirs(directory, exist_ok=True)
    filesystem(path, storage).get(files, targets)  # s3fs fetches a list concurrently
    return str(local)


def listing_digest(path: str, storage: StorageConfig) -> str:
    """A short hash of `path` and what it holds as listed (names, sizes, ETags or modification
    times): it changes when anything under `path` is written again, without reading the files."""
    import hashlib

    listing = filesystem(path, storage).find(path, detail=True)
    digest = hashlib.sha256(path.encode())
    for name, info in sorted(listing.items()):
        stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime")
        digest.update(f"\n{name}\t{info.get('size')}\t{stamp}".encode())
    return digest.hexdigest()[:16]


def local_copy(path: str, storage: StorageConfig, *, cache_root: str | os.PathLike | None = None) -> str:
    """`path` itself when local; for s3:// a local copy of the directory, downloaded once per machine
    into `cache_root` (default: the temp directory) and moved into place whole, so that processes
    sharing the machine (replicas, workers) never read a partial copy. The copy is keyed by the
    path and its listing (names, sizes, ETags): what is written again to the same prefix is
    downloaded again."""
    if scheme(path) == "file":
        return path
    import tempfile

    root = os.path.join(cache_root or tempfile.gettempdir(), "omniflow-downloads")
    cache = os.path.join(root, listing_digest(path, storage))
    if not os.path.isdir(cache):
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".download-", dir=root)
        download_dir(path, staging, storage)
        try:
            os.replace(staging, cache)
        except OSError:  # another process on this machine finished first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return cache


def local_file(path: str, storage: StorageConfig, *, cache_root: str | os.PathLike | None = None) -> str:
    """`path` itself when local; for s3:// a local copy of the one file, kept as `local_copy` keeps
    a directory's (once per machine, moved into place whole, keyed by the path and its listing)."""
    if scheme(path) == "file":
        return path
    import tempfile

    root = os.path.join(cache_root or tempfile.gettempdir(), "omniflow-downloads")
    target = os.path.join(root, f"{listing_digest(path, storage)}-{path.rstrip('/').rsplit('/', 1)[-1]}")
    if not os.path.isfile(target):
        os.makedirs(root, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=root, prefix=".download-")
        with os.fdopen(fd, "wb") as f:
            f.write(read_bytes(path, storage))
        os.replace(staging, target)
    return target


def upload_dir(local: str | os.PathLike, path: str, storage: StorageConfig, *, last: Sequence[str] = ()) -> None:
    """Copy every file under `local` to directory `path`, each write atomic; the files named in
    `last` (such as a manifest) go after all others, so their presence marks a complete copy."""
    names = sorted(
        os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs
    )
    batches = [[n for n in names if n not in last], [n for n in names if n in last]]
    if scheme(path) == "s3":  # each PUT is whole; s3fs sends a list concurrently
        fs = filesystem(path, storage)
        for batch in filter(None, batches):
            fs.put([os.path.join(local, n) for n in batch], [join(path, *n.split(os.sep)) for n in batch])
        return
    for name in batches[0] + batches[1]:
        with open(os.path.join(local, name), "rb") as f:
            write_bytes_atomic(join(path, *name.split(os.sep)), f.read(), storage)
