"""Raw samples from Parquet files, WebDataset tars, folders and generated sources, shard by shard.

A source config names where samples live; `list_shards` splits a source into stable shards (a file,
or a fixed run of samples) and `read_shard` reads one into a `READ_SAMPLE` table: the columns of
`schema.RAW_SAMPLE` plus `reject_stage` / `reject_reason`. Every sample gets the key
`"<source>/<shard>/<row index>"`, unique per run and the same on every rerun, which is what lets a
resumed job skip what it has already done. `read_sources` does the same on Ray Data, one task
per shard.

Bad input never raises. A sample whose file cannot be read (a path column naming a missing file, a
member over the read limit) is a row with `reject_stage="read"` and the reason. A shard that
cannot be read to its end (a corrupt or truncated tar, a file that is not Parquet) gives the rows
before the damage, then ONE row for the unreadable remainder: key `<source>/<shard>/<n>` where n
is the number of rows read before it, `sample_id` the shard, `reject_stage="read"` and what went
wrong. So each unreadable (part of a) shard counts as one input sample, rejected, and
input = kept + filtered + rejected stays exact; how many samples the damage hid is unknowable.
"""

import posixpath
import tarfile
import zlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Annotated, Any, Literal, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from pydantic import Field, TypeAdapter, model_validator

from omniflow import storage as st
from omniflow.storage import StorageConfig
from pipelines import plugins
from pipelines.parts import one_task_per_item
from pipelines.plugins import GeneratedSource, SourceBase
from pipelines.schema import READ_SAMPLE

READ_STAGE = "read"
CHUNK_ROWS = 256  # rows per table a reader yields: bounds a task's memory on big shards

# In order of preference, for a sample with two images (or two audio files).
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("wav", "flac")
CAPTION_EXTENSIONS = ("txt",)
PARQUET_SUFFIXES = (".parquet",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class _FileSource(SourceBase):
    path: str = Field(min_length=1, description="local path or s3:// URL")
    max_media_bytes: int = Field(
        256 * 2**20,
        gt=0,
        description="a media file or tar member larger than this is rejected unread",
    )


class ParquetSource(_FileSource):
    """Parquet files: `path` is a file, a directory (its `*.parquet`, recursively) or a glob.

    Each media column holds bytes, or (with `*_is_path`) a path or URL string; relative paths are
    resolved against `media_root`, by default the Parquet file's directory. Hugging Face style
    `struct<bytes, path>` columns work too. Without `id_column` a sample's id is `<shard>/<row>`.
    """

    type: Literal["parquet"] = "parquet"
    id_column: str | None = None
    image_column: str | None = "image"
    caption_column: str | None = "caption"
    audio_column: str | None = None
    image_is_path: bool = False
    audio_is_path: bool = False
    media_root: str | None = None

    @model_validator(mode="after")
    def _columns(self) -> "ParquetSource":
        if not (self.image_column or self.caption_column or self.audio_column):
            raise ValueError("set at least one of image_column, caption_column, audio_column")
        for modality in ("image", "audio"):
            if getattr(self, f"{modality}_is_path") and not getattr(self, f"{modality}_column"):
                raise ValueError(f"{modality}_is_path is set but {modality}_column is not")
        return self


class WebDatasetSource(_FileSource):
    """WebDataset tar shards in img2dataset's layout: `{key}.jpg|png|webp`, `{key}.txt`,
    `{key}.wav|flac` (and `{key}.json`, unused). `path`: a `.tar` file, a directory or a glob."""

    type: Literal["webdataset"] = "webdataset"


class FolderSource(_FileSource):
    """A directory tree of `{stem}.png|jpg|jpeg|webp`, `{stem}.txt`, `{stem}.wav|flac`, one sample
    per stem (its path below `path`, without the extension). Shards are runs of
    `samples_per_shard` stems in sorted order: whole samples, so no sample straddles two shards."""

    type: Literal["folder"] = "folder"
    samples_per_shard: int = Field(1000, ge=1)


# The built-in kinds, then the `GeneratedSource` types installed packages provide
# (`pipelines.plugins`), by `type`.
SourceConfig = Annotated[
    Union[ParquetSource, WebDatasetSource, FolderSource, *plugins.load(plugins.SOURCES)],
    Field(discriminator="type"),
]
_SOURCE_ADAPTER: TypeAdapter = TypeAdapter(SourceConfig)


def parse_source(data: dict[str, Any]) -> SourceConfig:
    """A source config from a dict such as a YAML entry; `type` picks the kind.

    >>> parse_source({"name": "photos", "type": "folder", "path": "data/photos"}).samples_per_shard
    1000
    """
    return _SOURCE_ADAPTER.validate_python(data)


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Shard:
    """What a task needs to read one shard: the file(s) it covers (none for a generated source)."""

    source: str
    shard: str
    paths: tuple[str, ...]


class _Damaged(ValueError):
    """A shard cannot be read from here on; the message says why."""


def list_shards(source: SourceConfig, storage: StorageConfig) -> list[str]:
    """The source's shard ids, sorted and stable while its files do not change.

    A file's shard id is its path below the source's directory (its name, for a flat layout);
    folder and generated shards are `part-00000`, `part-00001`, ... A source with no shards is a
    `ValueError` (a misspelt path should not curate nothing, quietly).

        >>> list_shards(FolderSource(name="photos", path="data/photos", samples_per_shard=250),
        ...             StorageConfig())    # 600 stems
        ['part-00000', 'part-00001', 'part-00002']
    """
    return [shard.shard for shard in _plan(source, storage)]


def _plan(source: SourceConfig, storage: StorageConfig) -> list[_Shard]:
    if isinstance(source, GeneratedSource):
        count = -(-source.samples // source.samples_per_shard)
        shards = [_Shard(source.name, _part(i), ()) for i in range(count)]
    elif isinstance(source, FolderSource):
        stems = _group_stems(
            st.list_files(source.path, storage), st.glob_root(source.path, storage)
        )
        names = sorted(stems)
        step = source.samples_per_shard
        shards = [
            _Shard(
                source.name,
                _part(i // step),
                tuple(sorted(p for n in names[i : i + step] for p in stems[n].values())),
            )
            for i in range(0, len(names), step)
        ]
    else:
        shards = [
            _Shard(source.name, shard, (path,)) for shard, path in _shard_files(source, storage)
        ]
    if not shards:
        raise ValueError(
            f"source {source.name!r}: no {source.type} input at {getattr(source, 'path', '')!r}"
        )
    return shards


def _part(index: int) -> str:
    return f"part-{index:05d}"


def _shard_files(
    source: ParquetSource | WebDatasetSource, storage: StorageConfig
) -> list[tuple[str, str]]:
    """(shard id, path) of each input file: a single file as given, else the files with the
    kind's suffix."""
    root = st.glob_root(source.path, storage)
    files = st.list_files(source.path, storage)
    if files != [st.absolute(source.path)]:
        suffixes = PARQUET_SUFFIXES if isinstance(source, ParquetSource) else TAR_SUFFIXES
        files = [f for f in files if f.lower().endswith(suffixes)]
    return [(st.relative_to(f, root), f) for f in files]


def _kind(extension: str) -> str | None:
    extension = extension.lower()
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in AUDIO_EXTENSIONS:
        return "audio"
    if extension in CAPTION_EXTENSIONS:
        return "caption"
    return None


def _group_stems(files: Sequence[str], root: str) -> dict[str, dict[str, str]]:
    """{stem: {"image"|"caption"|"audio": path}}; other files are ignored, and of two images (or
    audio files) for one stem the preferred extension wins."""
    rank = {
        ext: i for i, ext in enumerate(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS + CAPTION_EXTENSIONS)
    }
    stems: dict[str, dict[str, str]] = {}
    for path in sorted(files, key=lambda p: rank.get(p.rsplit(".", 1)[-1].lower(), len(rank))):
        stem, dot, extension = st.relative_to(path, root).rpartition(".")
        kind = _kind(extension) if dot else None
        if kind is not None:
            stems.setdefault(stem, {}).setdefault(kind, path)
    return stems


# ---------------------------------------------------------------- reading


def read_shard(source: SourceConfig, shard: str, storage: StorageConfig) -> pa.Table:
    """One shard as a `READ_SAMPLE` table (see the module docstring for bad input).

    >>> table = read_shard(FolderSource(name="photos", path="data/photos"), "part-00000", StorageConfig())
    >>> table.column("key").to_pylist()[:2]
    ['photos/part-00000/0', 'photos/part-00000/1']
    """
    if isinstance(source, (ParquetSource, WebDatasetSource)):
        planned = _Shard(source.name, shard, (st.join(st.glob_root(source.path, storage), shard),))
    else:
        planned = next((s for s in _plan(source, storage) if s.shard == shard), None)
        if planned is None:
            raise ValueError(f"source {source.name!r} has no shard {shard!r}")
    tables = list(_read(source, planned, storage, frozenset()))
    return pa.concat_tables(tables) if tables else READ_SAMPLE.empty_table()


def _read(
    source: SourceConfig, shard: _Shard, storage: StorageConfig, skip: frozenset[int]
) -> Iterator[pa.Table]:
    """Tables of at most `CHUNK_ROWS` rows; rows whose index is in `skip` are left out (and, where
    the format allows, their media are not fetched)."""
    reader = {
        ParquetSource: _read_parquet,
        WebDatasetSource: _read_tar,
        FolderSource: _read_folder,
    }.get(type(source), _read_generated)
    rows: list[dict[str, Any]] = []
    for row in reader(source, shard, storage, skip):
        if _index(row) not in skip:
            rows.append(row)
        if len(rows) >= CHUNK_ROWS:
            yield pa.Table.from_pylist(rows, schema=READ_SAMPLE)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SAMPLE)


def _index(row: dict[str, Any]) -> int:
    return int(row["key"].rsplit("/", 1)[1])


def _row(
    shard: _Shard, index: int, sample_id: str, problems: Sequence[str] = (), **media: Any
) -> dict[str, Any]:
    return {
        "key": f"{shard.source}/{shard.shard}/{index}",
        "source": shard.source,
        "shard": shard.shard,
        "sample_id": sample_id,
        "image": media.get("image"),
        "caption": media.get("caption"),
        "audio": media.get("audio"),
        "reject_stage": READ_STAGE if problems else None,
        "reject_reason": "; ".join(problems) if problems else None,
    }


def _unreadable(shard: _Shard, index: int, err: Exception) -> dict[str, Any]:
    where = f"after {index} samples" if index else "from the start"
    return _row(shard, index, shard.shard, [f"shard unreadable {where}: {_describe(err)}"])


def _describe(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return f"not found: {err.filename or (err.args[0] if err.args else '')}"
    if isinstance(err, _Damaged):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _text(data: bytes) -> str:
    """File bytes as a caption; undecodable bytes become U+FFFD, which decoding then rejects."""
    return data.decode("utf-8-sig", errors="replace").rstrip("\r\n")


# The errors that mean "this file is damaged or missing", as opposed to a bug in this module.
_SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, pa.ArrowException, _Damaged)


def _read_generated(
    source: GeneratedSource, shard: _Shard, storage: StorageConfig, skip: frozenset[int]
) -> Iterator[dict]:
    start = int(shard.shard.removeprefix("part-")) * source.samples_per_shard
    for index, record in enumerate(source.records()[start : start + source.samples_per_shard]):
        yield _row(shard, index, record["id"], **{m: record[m] for m in source.modalities})


# ---- WebDataset tars


def _read_tar(
    source: WebDatasetSource, shard: _Shard, storage: StorageConfig, skip: frozenset[int]
) -> Iterator[dict]:
    count = 0
    try:
        with (
            st.open_input(shard.paths[0], storage) as f,
            tarfile.open(fileobj=f, mode="r:*") as tar,
        ):
            for key, parts, problems in _tar_samples(tar, f, skip, source.max_media_bytes):
                yield _row(shard, count, key, problems, **parts)
                count += 1
    except _SHARD_ERRORS as err:
        yield _unreadable(shard, count, err)


def _tar_samples(
    tar: tarfile.TarFile, f: IO[bytes], skip: frozenset[int], max_bytes: int
) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    """(key, {"image"|"caption"|"audio": value}, problems) per sample, in archive order.

    A sample is yielded once the next one starts (or the archive ends cleanly), so one cut short
    by damage is never passed off as whole. Members of skipped samples are not read.
    """
    key: str | None = None
    parts: dict[str, Any] = {}
    problems: list[str] = []
    index = -1
    for member in tar:
        directory, base = posixpath.split(member.name)
        if not member.isfile() or base.startswith("."):
            continue
        stem, _, extension = base.partition(".")
        name = posixpath.join(directory, stem)
        if name != key:
            if key is not None:
                yield key, parts, problems
            key, parts, problems, index = name, {}, [], index + 1
        kind = _kind(extension)
        if index in skip or kind is None or kind in parts:
            continue
        if member.size > max_bytes:
            problems.append(
                f"{kind} member {base} is {member.size:,} bytes, "
                f"over the {max_bytes:,}-byte read limit"
            )
            parts[kind] = None
            continue
        data = tar.extractfile(member).read()
        parts[kind] = _text(data) if kind == "caption" else data
    if tar.fileobj is f:  # uncompressed: compressed streams catch damage in their own checks
        _check_tar_end(f, tar.offset)
    if key is not None:
        yield key, parts, problems


def _check_tar_end(f: IO[bytes], offset: int) -> None:
    """`tarfile` stops quietly at an unreadable header or at the end of the file, so look: after
    the last member only zero padding may follow."""
    end = f.seek(0, 2)
    if offset > end:
        raise _Damaged(
            f"tar is truncated: it ends at byte {end:,}, in a member that runs to byte {offset:,}"
        )
    f.seek(offset)
    while chunk := f.read(1 << 20):
        if chunk.strip(b"\0"):
            raise _Damaged(f"tar has an unreadable header at byte {offset:,}; what follows is lost")


# ---- folders


def _read_folder(
    source: FolderSource, shard: _Shard, storage: StorageConfig, skip: frozenset[int]
) -> Iterator[dict]:
    stems = _group_stems(shard.paths, st.glob_root(source.path, storage))
    names = sorted(stems)
    for start in range(0, len(names), CHUNK_ROWS):
        chunk = [
            (i, n) for i, n in enumerate(names[start : start + CHUNK_ROWS], start) if i not in skip
        ]
        paths = [p for _, n in chunk for p in stems[n].values()]
        read = st.read_many(paths, storage, max_bytes=source.max_media_bytes)
        data = dict(zip(paths, read, strict=True))
        for index, name in chunk:
            parts, problems = {}, []
            for kind, path in stems[name].items():
                value = data[path]
                if isinstance(value, Exception):
                    problems.append(
                        f"{kind} file {posixpath.basename(path)} could not be read: "
                        + _describe(value)
                    )
                else:
                    parts[kind] = _text(value) if kind == "caption" else value
            yield _row(shard, index, name, problems, **parts)


# ---- Parquet


def _read_parquet(
    source: ParquetSource, shard: _Shard, storage: StorageConfig, skip: frozenset[int]
) -> Iterator[dict]:
    path = shard.paths[0]
    media_root = source.media_root or posixpath.dirname(path)
    count = 0
    try:
        with st.open_input(path, storage) as f:
            parquet = pq.ParquetFile(f)
            columns = _parquet_columns(source, parquet.schema_arrow)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=list(dict.fromkeys(columns.values())))
                rows = _parquet_rows(
                    source, shard, table, columns, count, skip, media_root, storage
                )
                count += table.num_rows
                yield from rows
    except _SHARD_ERRORS as err:
        yield _unreadable(shard, count, err)


def _parquet_columns(source: ParquetSource, schema: pa.Schema) -> dict[str, str]:
    """{"id"|"image"|"caption"|"audio": column} for the configured columns; a missing one damages
    the shard (the file does not hold what the config says)."""
    wanted = {
        "id": source.id_column,
        "image": source.image_column,
        "caption": source.caption_column,
        "audio": source.audio_column,
    }
    missing = [c for c in wanted.values() if c and c not in schema.names]
    if missing:
        raise _Damaged(f"Parquet file has no column {missing[0]!r} (it has {schema.names})")
    return {role: column for role, column in wanted.items() if column}


def _parquet_rows(
    source: ParquetSource,
    shard: _Shard,
    table: pa.Table,
    columns: dict[str, str],
    first: int,
    skip: frozenset[int],
    media_root: str,
    storage: StorageConfig,
) -> list[dict]:
    n = table.num_rows
    ids = _strings(table.column(columns["id"]), "id") if "id" in columns else [None] * n
    captions = (
        _strings(table.column(columns["caption"]), "caption")
        if "caption" in columns
        else [None] * n
    )
    media = {
        kind: _media(table.column(columns[kind]), columns[kind], getattr(source, f"{kind}_is_path"))
        if kind in columns
        else [(None, None)] * n
        for kind in ("image", "audio")
    }
    keep = [i for i in range(n) if first + i not in skip]
    fetched: dict[str, bytes | Exception] = {}
    wanted = sorted(
        {_resolve(p, media_root) for kind in media for i in keep if (p := media[kind][i][1])}
    )
    for start in range(0, len(wanted), CHUNK_ROWS):
        batch = wanted[start : start + CHUNK_ROWS]
        read = st.read_many(batch, storage, max_bytes=source.max_media_bytes)
        fetched.update(zip(batch, read, strict=True))
    rows = []
    for i in keep:
        parts: dict[str, Any] = {"caption": captions[i]}
        problems = []
        for kind in ("image", "audio"):
            data, path = media[kind][i]
            if path is not None:
                data = fetched[_resolve(path, media_root)]
                if isinstance(data, Exception):
                    problems.append(f"{kind} file {path} could not be read: {_describe(data)}")
                    data = None
            parts[kind] = data
        sample_id = ids[i] if ids[i] is not None else f"{shard.shard}/{first + i}"
        rows.append(_row(shard, first + i, sample_id, problems, **parts))
    return rows


def _strings(column: pa.ChunkedArray, role: str) -> list[str | None]:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else _text(v) for v in column.to_pylist()]
    try:
        return pc.cast(column, pa.string()).to_pylist()
    except pa.ArrowException:
        raise _Damaged(f"{role} column has type {column.type}, not text") from None


def _media(
    column: pa.ChunkedArray, name: str, is_path: bool
) -> list[tuple[bytes | None, str | None]]:
    """(bytes, path) per row, exactly one of them set (or neither, for a null)."""
    kind = column.type
    if pa.types.is_struct(kind) and {"bytes", "path"} & {f.name for f in kind}:
        values = [v or {} for v in column.to_pylist()]
        return [
            (v["bytes"], None) if v.get("bytes") is not None else (None, v.get("path"))
            for v in values
        ]
    binary = (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    )
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if binary and not is_path:
        return [(v, None) for v in column.to_pylist()]
    if text and is_path:
        return [(None, v) for v in column.to_pylist()]
    if text:
        raise _Damaged(
            f"column {name!r} holds strings: set {name}_is_path if they are paths or URLs"
        )
    if binary:
        raise _Damaged(f"column {name!r} holds bytes, but the config says it holds paths")
    raise _Damaged(f"column {name!r} has type {kind}; expected bytes, or path strings")


def _resolve(path: str, media_root: str) -> str:
    """Absolute paths and URLs as they are; relative paths below `media_root`."""
    return path if "://" in path or path.startswith("/") else st.join(media_root, path)


# ---------------------------------------------------------------- Ray Data


def read_sources(
    sources: Sequence[SourceConfig],
    storage: StorageConfig,
    *,
    skip_keys: Collection[str] | None = None,
    skip_shards: Collection[str] | None = None,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Every sample of `sources` as a Ray Dataset of `READ_SAMPLE` rows, one read task per shard.

    Shards are listed here, on the driver; tasks read them in parallel. `skip_keys` are sample
    keys already processed (e.g. by a killed run) and `skip_shards` are `"<source>/<shard>"` ids
    done as a whole: neither is read again, so a resumed job neither loses nor repeats a row.

        >>> ds = read_sources([FolderSource(name="photos", path="data/photos")], StorageConfig(),
        ...                   skip_keys={"photos/part-00000/0"})
        >>> ds.count()     # 8 stems
        7
    """
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"source names must be unique; repeated: {repeated}")
    sources = [_absolute(s) for s in sources]
    skipped_rows = _rows_by_shard(skip_keys or ())
    skip_shards = set(skip_shards or ())
    items = [
        {
            "source": shard.source,
            "shard": shard.shard,
            "paths": list(shard.paths),
            "skip": sorted(skipped_rows.get(ref, ())),
        }
        for source in sources
        for shard in _plan(source, storage)
        if (ref := f"{shard.source}/{shard.shard}") not in skip_shards
    ]
    if not items:
        return ray.data.from_arrow(READ_SAMPLE.empty_table())
    return one_task_per_item(items, _read_items, fn_kwargs={"sources": {s.name: s for s in sources}, "storage": storage},
                             num_cpus=num_cpus)


def _read_items(
    batch: pa.Table, *, sources: dict[str, SourceConfig], storage: StorageConfig
) -> Iterator[pa.Table]:
    """Ray Data task body: read the shards a batch of descriptors names."""
    empty = True
    for item in batch.to_pylist():
        shard = _Shard(item["source"], item["shard"], tuple(item["paths"] or ()))
        for table in _read(sources[item["source"]], shard, storage, frozenset(item["skip"] or ())):
            empty = False
            yield table
    if empty:  # a shard skipped whole still yields a block with the right columns
        yield READ_SAMPLE.empty_table()


def _rows_by_shard(keys: Collection[str]) -> dict[str, set[int]]:
    """{"<source>/<shard>": {row index, ...}} from sample keys; a key that does not parse is
    ignored (it can match no row)."""
    out: dict[str, set[int]] = {}
    for key in keys:
        ref, _, index = key.rpartition("/")
        if ref and index.isdigit():
            out.setdefault(ref, set()).add(int(index))
    return out


def _absolute(source: SourceConfig) -> SourceConfig:
    """The source with local paths made absolute, so workers with another cwd read the same
    files."""
    update = {}
    for field in ("path", "media_root"):
        value = getattr(source, field, None)
        if value is not None:
            update[field] = st.absolute(value)
    return source.model_copy(update=update)
