"""Hostile input against every per-sample check: the decode stage, the service's input path and
its request validation must answer each batch in seconds, account for every row, and never raise.

Random bytes as media, megabyte captions, degenerate Unicode, and files whose headers lie
(`hostile_media`), all from a seeded generator so that a failure reproduces.
"""

import time

import numpy as np
import pyarrow as pa
import pytest
from hostile_media import flac_claiming, jpeg, jpeg_scan_bomb, png_claiming, wav_claiming

from omniflow.codecs.media import MediaError, encode_audio, encode_image
from omniflow.inference import InputPreparer
from omniflow.modality import Modality
from pipelines.decode import Decode, DecodeConfig
from pipelines.schema import SCORED_SAMPLE, conform
from pipelines.scorers import tokenizer_text
from pipelines.sources import READ_SAMPLE
from serve.schema import GenerateRequest, Limits, check_request

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

SEED = 20240611
BATCH_SECONDS = 5.0  # generous: each batch takes well under a second
MB = 2**20
TONE = encode_audio((0.5 * np.sin(np.arange(16_000) / 3)).astype(np.float32), 16_000)
PNG = encode_image(np.full((16, 16, 3), 90, np.uint8))


def _random_bytes(rng: np.random.Generator, prefix: bytes = b"") -> bytes:
    return prefix + rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()


def _degenerate_captions(rng: np.random.Generator) -> dict[str, str]:
    """Captions by name: over the 2000-character limit, or odd but within it."""
    letters = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=1000))
    return {
        "1 MB of one letter": "a" * MB,
        "10 MB of random letters": letters * (10 * MB // 1000),
        "1 MB of one letter after a URL": "http://" + "a" * MB,
        "1 MB of www.": "www." * (MB // 4),
        "1 MB of NULs": "\0" * MB,
        "1 MB of combining marks": "a" + "\u0301" * MB,
        "1 MB of emoji ZWJ sequences": "\U0001f469\u200d\U0001f469\u200d\U0001f467" * (MB // 5),
        "1 MB of right-to-left overrides": "\u202e\u0627" * (MB // 2),
        "1 MB of escaped surrogates": "\\ud800\\udfff" * (MB // 12),
        "1 MB of replacement characters": "\ufffd" * MB,
        "2001 spaces": " " * 2001,
        # within the limit
        "2000 combining marks": "a" + "\u0301" * 1999,
        "emoji ZWJ family": "\U0001f469\u200d\U0001f469\u200d\U0001f467 at the beach",
        "right-to-left": "\u202eدائرة حمراء",
        "escaped surrogates as text": "\\ud800 literally",
        "NULs": "red\0circle",
        "only spaces": " " * 2000,
        "one URL": "https://example.com/" + "a" * 1900,
        "URL-like punctuation": "".join(rng.choice(list("ab:/. w"), size=2000)),
    }


# What decode must say about each caption (None: kept).
CAPTION_VERDICTS = {
    "1 MB": "over max_caption_chars=2000",
    "10 MB": "over max_caption_chars=2000",
    "2001 spaces": "over max_caption_chars=2000",
    "2000 combining marks": None,
    "emoji ZWJ family": None,
    "right-to-left": None,
    "escaped surrogates as text": None,
    "NULs": "non-printable",
    "only spaces": "empty",
    "one URL": "only a URL",
    "URL-like punctuation": None,
}


def _verdict(name: str) -> str | None:
    return next(v for k, v in CAPTION_VERDICTS.items() if name.startswith(k))


def _lying_media() -> dict[str, tuple[str, bytes, str]]:
    """name -> (column, bytes, the reason decode must give)."""
    full_jpeg = jpeg(128)
    return {
        "PNG claiming 100000x100000": (
            "image",
            png_claiming(100_000, 100_000),
            "decompression bomb",
        ),
        "PNG claiming 10000x10000": ("image", png_claiming(10_000, 10_000), "pixel limit"),
        "PNG claiming 0x0": ("image", png_claiming(0, 0), "could not be decoded"),
        "truncated JPEG": ("image", full_jpeg[: len(full_jpeg) // 3], "could not be decoded"),
        "JPEG of 10,000 scans": ("image", jpeg_scan_bomb(10_000), "10,000 scans"),
        "truncated PNG": ("image", PNG[:40], "could not be decoded"),
        "WAV claiming 2^31 frames": (
            "audio",
            wav_claiming(frames=2**31 - 1, data=b""),
            "no samples",
        ),
        "WAV claiming 1025 channels": (
            "audio",
            wav_claiming(frames=10, channels=1025),
            "could not be decoded",
        ),
        "WAV claiming 2^31 Hz": (
            "audio",
            wav_claiming(frames=100, sample_rate=2**31 - 1),
            "sample rate",
        ),
        "FLAC claiming 2^36 frames": ("audio", flac_claiming(frames=2**36 - 1), "60-second limit"),
        "truncated WAV": ("audio", TONE[:30], "could not be decoded"),
    }


def _rows(**columns: list) -> pa.Table:
    """A READ_SAMPLE batch, as the readers hand one to `Decode` on Ray Data."""
    n = len(next(iter(columns.values())))
    rows = [
        {
            "key": f"fuzz/0/{i}",
            "source": "fuzz",
            "shard": "0",
            "sample_id": str(i),
            **{name: values[i] for name, values in columns.items()},
        }
        for i in range(n)
    ]
    return conform(pa.Table.from_pylist(rows), READ_SAMPLE)


def _decode_timed(batch: pa.Table, config: DecodeConfig | None = None) -> list[dict]:
    start = time.perf_counter()
    out = Decode(config or DecodeConfig())(batch)
    assert time.perf_counter() - start < BATCH_SECONDS
    assert out.schema == SCORED_SAMPLE
    assert out.column("key").to_pylist() == batch.column("key").to_pylist()  # every row, in order
    rows = out.to_pylist()
    for row in rows:  # kept, or rejected with a reason
        assert (row["reject_stage"] is None) == (row["reject_reason"] is None), row["key"]
    return rows


def test_random_bytes_as_media_are_rejected_with_reasons():
    rng = np.random.default_rng(SEED)
    magics = [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"RIFF\x00\x01\x00\x00WAVEfmt ",
        b"fLaC",
        b"OggS",
    ]
    images = [_random_bytes(rng, magics[i % len(magics)]) for i in range(96)]
    audio = [_random_bytes(rng, magics[(i + 3) % len(magics)]) for i in range(96)]
    captions = ["a red circle"] * 96
    rows = _decode_timed(_rows(image=images, caption=captions, audio=audio))
    for row in rows:
        assert row["reject_stage"] == "decode", row["key"]
        reasons = row["reject_reason"]
        assert "image" in reasons and "audio" in reasons, reasons  # both problems are reported


def test_degenerate_captions_get_their_verdict_fast():
    captions = _degenerate_captions(np.random.default_rng(SEED))
    rows = _decode_timed(_rows(caption=list(captions.values())))
    for (name, caption), row in zip(captions.items(), rows, strict=True):
        expected = _verdict(name)
        if expected is None:
            assert row["reject_stage"] is None, (name, row["reject_reason"])
        else:
            assert row["reject_stage"] == "decode" and expected in row["reject_reason"], (
                name,
                row["reject_reason"],
            )
        assert row["caption"] == caption and row["content_hash"] is not None


@pytest.mark.parametrize("size", [MB, 10 * MB])
def test_a_huge_caption_is_rejected_in_milliseconds(size):
    batch = _rows(caption=["a" * size], image=[PNG])
    start = time.perf_counter()
    (row,) = Decode(DecodeConfig())(batch).to_pylist()
    assert time.perf_counter() - start < 0.1 * size / MB  # one pass at most; a megabyte in 0.1 s
    assert row["reject_reason"] == f"caption is {size:,} characters, over max_caption_chars=2000"


def test_lying_and_truncated_headers_are_refused_before_decoding():
    media = _lying_media()
    columns = {"image": [], "audio": [], "caption": []}
    for column, data, _ in media.values():
        columns["image"].append(data if column == "image" else None)
        columns["audio"].append(data if column == "audio" else None)
        columns["caption"].append("a red circle")
    rows = _decode_timed(_rows(**columns))
    for (name, (_, _, reason)), row in zip(media.items(), rows, strict=True):
        assert row["reject_stage"] == "decode" and reason in row["reject_reason"], (
            name,
            row["reject_reason"],
        )


def test_valid_media_cut_at_random_points_never_raise():
    rng = np.random.default_rng(SEED)
    sources = [
        PNG,
        jpeg(64),
        jpeg(64, progressive=True),
        TONE,
        encode_audio(np.sin(np.arange(4000) / 2), 8000, format="FLAC"),
    ]
    images, audio = [], []
    for i in range(120):
        data = sources[i % len(sources)]
        cut = bytearray(data[: int(rng.integers(1, len(data)))])
        if i % 2 and cut:  # and flip a byte
            cut[int(rng.integers(0, len(cut)))] ^= 0xFF
        is_image = i % len(sources) < 3
        images.append(bytes(cut) if is_image else None)
        audio.append(None if is_image else bytes(cut))
    rows = _decode_timed(_rows(image=images, audio=audio))
    assert sum(r["reject_stage"] == "decode" for r in rows) > 60  # most cuts are unusable


# ---- the service's input path


@pytest.fixture(scope="module")
def prepare() -> InputPreparer:
    """A preparer for a model with image, audio and text codecs (configs only, no weights)."""
    return InputPreparer(
        {
            "image": {"kind": "image-vae", "path": "unused", "resolution": 16},
            "audio": {"kind": "mel-vae", "path": "unused"},
            "text": {"kind": "omniflow-text-vae", "path": "unused"},
        },
        max_image_pixels=16_000_000,
        max_text_chars=2000,
    )


def _prepare_timed(prepare: InputPreparer, **inputs) -> str | None:
    """The MediaError's message, or None when the input was accepted."""
    start = time.perf_counter()
    try:
        prepare(**inputs)
        message = None
    except MediaError as err:
        message = str(err)
    assert time.perf_counter() - start < BATCH_SECONDS
    return message


def test_input_preparer_refuses_hostile_text_first(prepare):
    for name, caption in _degenerate_captions(np.random.default_rng(SEED)).items():
        start = time.perf_counter()
        message = _prepare_timed(prepare, text=caption)
        if len(caption) > 2000:
            assert (
                message == f"text: text has {len(caption):,} characters, above the limit of 2,000"
            ), name
            assert time.perf_counter() - start < 0.1 * max(1, len(caption) / MB), name
        elif not caption.strip():
            assert "empty" in message
        else:
            assert message is None, (name, message)
    assert "lone surrogate at character 4" in _prepare_timed(prepare, text="red \ud800 circle")
    assert prepare(text="a red circle") == {Modality.TEXT: "a red circle"}


def test_input_preparer_refuses_hostile_media(prepare):
    rng = np.random.default_rng(SEED)
    for _ in range(40):
        assert "image:" in _prepare_timed(prepare, image=_random_bytes(rng, b"\x89PNG\r\n\x1a\n"))
        assert "audio:" in _prepare_timed(prepare, audio=_random_bytes(rng, b"RIFF"))
    for name, (column, data, _) in _lying_media().items():
        message = _prepare_timed(prepare, **{column: data})
        assert message is not None and message.startswith(f"{column}:"), name
    image, audio = prepare(image=PNG)[Modality.IMAGE], prepare(audio=TONE)[Modality.AUDIO]
    assert image.value.shape == (3, 16, 16) and image.original == PNG
    assert audio.value.shape == (20_480,) and audio.original == TONE


def test_request_validation_refuses_a_long_text_before_anything_else():
    limits = Limits()
    for size in (MB, 10 * MB):
        start = time.perf_counter()
        request = GenerateRequest.model_validate(
            {"task": "t2i", "text": "\u0301" * size, "steps": 10**6}
        )
        with pytest.raises(
            ValueError, match=f"text has {size:,} characters, above the limit of 2,000"
        ):
            check_request(request, limits)  # the text's limit is named, not the steps'
        assert time.perf_counter() - start < 0.1 * size / MB
    check_request(GenerateRequest.model_validate({"task": "t2i", "text": "a" * 2000}), limits)


# ---- scoring


def test_scorers_tokenise_hostile_captions_in_bounded_time():
    import open_clip

    tokenize = open_clip.get_tokenizer("ViT-B-32")  # open_clip's own BPE, shipped with it
    rng = np.random.default_rng(SEED)
    word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=MB))  # one 1 MB word
    for caption in (word, "\u0301" * MB, "!?" * MB):
        start = time.perf_counter()
        tokenize([tokenizer_text(caption)])
        assert time.perf_counter() - start < 1.0  # unbounded: 20,000 letters alone took 4 s
    words = [
        "".join(rng.choice(list("abcdefghij"), size=int(rng.integers(1, 12)))) for _ in range(2000)
    ]
    for caption in ("a red circle, top left", " ".join(words), "see https://example.com/a/b.png"):
        assert (tokenize([tokenizer_text(caption)]) == tokenize([caption])).all()
