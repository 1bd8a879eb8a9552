"""The CPU decode stage: validate every sample's media and caption, measure them, hash them.

`Decode` is a Ray Data callable class (`batch_format="pyarrow"`). Per row it decodes the image and
the audio (`omniflow.codecs.media`) to prove they are usable and to fill `image_width`,
`image_height` and `audio_seconds`; checks the caption; and computes `content_hash`. Anything
unusable sets `reject_stage="decode"` and a readable `reject_reason` (all of a row's problems,
joined by "; "). It never raises for bad input. Rows rejected earlier (`reject_stage="read"`) pass
through untouched. The output has `schema.SCORED_SAMPLE`'s columns, scores null, media kept.

Judging content (a blank or noisy image, a caption that does not match) is the scorers' job: an
image that decodes is accepted here, whatever it shows.

    >>> from pipelines.sources import FolderSource, read_shard
    >>> from omniflow.storage import StorageConfig
    >>> raw = read_shard(FolderSource(name="photos", path="data/photos"), "part-00000", StorageConfig())
    >>> Decode(DecodeConfig())(raw).column("image_width").to_pylist()[:2]
    [512, 768]

On Ray Data: `ds.map_batches(Decode, **Decode.map_batches_kwargs(config))`.
"""

import hashlib
import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from omniflow.codecs.media import MAX_IMAGE_PIXELS, MediaError, decode_audio, decode_image
from pipelines.schema import SCHEMA_VERSION, SCORED_SAMPLE, conform

DECODE_STAGE = "decode"
_URL_AT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S|www\.\S")  # a URL starting here
_TRIVIAL = " \t\r\n\f\v" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_ALLOWED_CONTROLS = set("\t\n\r")


class DecodeConfig(BaseModel):
    """Limits that make a sample a reject, and the stage's resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_bytes: int = Field(32 * 2**20, gt=0)
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, gt=0, description="width x height; more is a decompression bomb"
    )
    max_audio_bytes: int = Field(64 * 2**20, gt=0)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_caption_chars: int = Field(2000, gt=0)
    batch_size: int = Field(64, ge=1)
    concurrency: int | tuple[int, int] | None = Field(
        None,
        description="actors: a fixed count, a (min, max) range, or None for Ray's default",
    )
    num_cpus: float = Field(1.0, gt=0)


class Decode:
    """Ray Data stage: READ_SAMPLE (or RAW_SAMPLE) batches in, SCORED_SAMPLE batches out."""

    def __init__(self, config: DecodeConfig | None = None):
        self.config = config or DecodeConfig()

    @staticmethod
    def map_batches_kwargs(config: DecodeConfig) -> dict[str, Any]:
        """Keyword arguments for `Dataset.map_batches(Decode, ...)`: the stage's resources."""
        import ray.data

        if config.concurrency is None:
            compute = ray.data.ActorPoolStrategy(min_size=1)
        elif isinstance(config.concurrency, int):
            compute = ray.data.ActorPoolStrategy(size=config.concurrency)
        else:
            compute = ray.data.ActorPoolStrategy(
                min_size=config.concurrency[0], max_size=config.concurrency[1]
            )
        return {
            "fn_constructor_kwargs": {"config": config},
            "batch_size": config.batch_size,
            "batch_format": "pyarrow",
            "compute": compute,
            "num_cpus": config.num_cpus,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decode a batch; rows that already carry a `reject_stage` keep it and are not decoded."""
        if batch.num_rows == 0:  # Ray may pass an empty block without columns
            return SCORED_SAMPLE.empty_table()
        given = {
            name: _column(batch, name)
            for name in ("image", "caption", "audio", "reject_stage", "reject_reason")
        }
        results = [
            decode_row(image, caption, audio, self.config)
            if stage is None
            else Decoded(stage, reason)
            for image, caption, audio, stage, reason in zip(*given.values(), strict=True)
        ]
        added = [f.name for f in fields(Decoded)] + ["schema_version"]
        out = batch.drop_columns([name for name in added if name in batch.column_names])
        for f in fields(Decoded):
            out = out.append_column(
                f.name,
                pa.array([getattr(r, f.name) for r in results], SCORED_SAMPLE.field(f.name).type),
            )
        out = out.append_column(
            "schema_version", pa.array([SCHEMA_VERSION] * batch.num_rows, pa.int16())
        )
        return conform(out, SCORED_SAMPLE)


def _column(batch: pa.Table, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


@dataclass(frozen=True, slots=True)
class Decoded:
    """What decoding learnt about one row (the columns `Decode` adds)."""

    reject_stage: str | None = None
    reject_reason: str | None = None
    image_width: int | None = None
    image_height: int | None = None
    audio_seconds: float | None = None
    content_hash: str | None = None


def decode_row(
    image: bytes | None, caption: str | None, audio: bytes | None, config: DecodeConfig
) -> Decoded:
    """Validate one sample; a missing modality (null) is fine, a present but bad one is not.

    Sizes come first and cost nothing (byte and character counts): a row over any of them is
    rejected for that, and nothing of it is decoded or scanned. So no row costs more than the
    limits allow, whatever it holds."""
    problems = size_problems(image, caption, audio, config)
    width = height = seconds = None
    if not problems:
        if image is None and caption is None and audio is None:
            problems.append("sample has no image, caption or audio")
        if image is not None:
            try:
                width, height = decode_image(image, max_pixels=config.max_image_pixels).size
            except MediaError as err:
                problems.append(str(err))
            except Exception as err:  # noqa: BLE001 - crafted files raise beyond decoders' docs
                problems.append(f"image could not be decoded: {type(err).__name__}: {err}")
        if audio is not None:
            try:
                wave, sample_rate = decode_audio(audio, max_seconds=config.max_audio_seconds)
                seconds = len(wave) / sample_rate
            except MediaError as err:
                problems.append(str(err))
            except Exception as err:  # noqa: BLE001 - as for images
                problems.append(f"audio could not be decoded: {type(err).__name__}: {err}")
        if caption is not None:
            problem = caption_problem(caption, max_chars=config.max_caption_chars)
            if problem:
                problems.append(problem)
    return Decoded(
        DECODE_STAGE if problems else None,
        "; ".join(problems) if problems else None,
        image_width=width,
        image_height=height,
        audio_seconds=seconds,
        content_hash=content_hash(image, caption, audio),
    )


def size_problems(
    image: bytes | None, caption: str | None, audio: bytes | None, config: DecodeConfig
) -> list[str]:
    """The limits a row's fields exceed by their length alone (constant time per row)."""
    problems = []
    if image is not None and len(image) > config.max_image_bytes:
        problems.append(
            f"image is {len(image):,} bytes, over max_image_bytes={config.max_image_bytes}"
        )
    if audio is not None and len(audio) > config.max_audio_bytes:
        problems.append(
            f"audio is {len(audio):,} bytes, over max_audio_bytes={config.max_audio_bytes}"
        )
    if caption is not None and len(caption) > config.max_caption_chars:
        problems.append(_too_long(caption, config.max_caption_chars))
    return problems


def caption_problem(caption: str, *, max_chars: int) -> str | None:
    """Why a caption is unusable, or None. Language-agnostic: any script passes; what fails is
    excess length (checked first, before anything reads the text), emptiness, binary junk (control
    characters, U+FFFD from undecodable bytes, unassigned or surrogate code points) and a bare URL.
    Every check is one pass over the text.

        >>> caption_problem("一只红色的圆", max_chars=100) is None
        True
        >>> caption_problem("https://example.com/cat.jpg", max_chars=100)
        'caption is only a URL'
    """
    if len(caption) > max_chars:
        return _too_long(caption, max_chars)
    if not caption.strip():
        return "caption is empty or whitespace"
    junk = sum(1 for c in caption if _is_junk(c))
    if junk:
        return f"caption contains {junk} non-printable or undecodable characters (binary data?)"
    if _only_urls(caption):
        return "caption is only a URL"
    return None


def _too_long(caption: str, max_chars: int) -> str:
    return f"caption is {len(caption):,} characters, over max_caption_chars={max_chars}"


def _is_junk(char: str) -> bool:
    if char == "\ufffd":
        return True
    category = unicodedata.category(char)
    return (category == "Cc" and char not in _ALLOWED_CONTROLS) or category in ("Cs", "Cn")


def _only_urls(caption: str) -> bool:
    """Whether nothing but URLs (`scheme://...` or `www....` up to the next whitespace) and
    punctuation remains. One pass: a URL runs to the end of its whitespace-separated word, so each
    word must be punctuation followed by a URL that starts exactly where the punctuation ends
    (a regex searched over the whole text would retry the scheme at every letter: quadratic)."""
    if any(c.isspace() and c not in _TRIVIAL for c in caption):
        return False
    for word in caption.split():
        start = len(word) - len(word.lstrip(_TRIVIAL))
        if start < len(word) and not _URL_AT.match(word, start):
            return False
    return True


def content_hash(image: bytes | None, caption: str | None, audio: bytes | None) -> str | None:
    """sha256 over (image bytes, caption UTF-8, audio bytes), each framed by a presence flag and
    its length, so exact duplicates share a hash and no two different samples can collide by
    shifting bytes between fields. None for a row with nothing in it."""
    if image is None and caption is None and audio is None:
        return None
    digest = hashlib.sha256()
    for part in (
        image,
        None if caption is None else caption.encode("utf-8", "surrogatepass"),
        audio,
    ):
        if part is None:
            digest.update(b"\x00")
        else:
            digest.update(b"\x01" + len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()
