"""Decode stage: every kind of bad input becomes a reject with a readable reason, never an error."""

import io
import re
import time

import numpy as np
import pyarrow as pa
import pytest
import soundfile
from hostile_media import flac_claiming, png_claiming
from pydantic import ValidationError

from omniflow.codecs.media import encode_audio, encode_image
from pipelines.decode import Decode, DecodeConfig, caption_problem, content_hash
from pipelines.schema import RAW_SAMPLE, SCORED_SAMPLE, conform
from pipelines.sources import READ_SAMPLE
from shapesworld.defects import DEFECTS, make_records

TONE = encode_audio((0.5 * np.sin(np.linspace(0, 880 * np.pi, 16000))).astype(np.float32), 16000)
IMAGE = encode_image(np.full((8, 12, 3), 200, np.uint8))


def batch(rows: list[dict], schema: pa.Schema = READ_SAMPLE) -> pa.Table:
    """Rows of {image, caption, audio, ...} as a reader would give them."""
    filled = [
        {"key": f"s/0/{i}", "source": "s", "shard": "0", "sample_id": str(i), **r}
        for i, r in enumerate(rows)
    ]
    return conform(pa.Table.from_pylist(filled), schema)


def decode(rows: list[dict], config: DecodeConfig | None = None) -> list[dict]:
    out = Decode(config)(batch(rows))
    assert out.schema == SCORED_SAMPLE
    return out.to_pylist()


def test_planted_defects():
    records = make_records(16, seed=0, defect_rate=0.5)
    assert {r["defect"] for r in records} == {None, *DEFECTS}
    out = Decode()(
        batch([{k: r[k] for k in ("image", "caption", "audio")} for r in records], RAW_SAMPLE)
    )
    assert out.schema == SCORED_SAMPLE
    # Undecodable media is decode's to reject; what decodable media show is the scorers' job.
    expected = {
        "truncated_image": "image could not be decoded",
        "garbage_image": "image could not be decoded",
        "silent_audio": "audio is silent",
        "garbage_audio": "audio could not be decoded",
    }
    for record, row in zip(records, out.to_pylist(), strict=True):
        if record["defect"] in expected:
            assert row["reject_stage"] == "decode", record["defect"]
            assert expected[record["defect"]] in row["reject_reason"]
        else:
            assert row["reject_stage"] is None and row["reject_reason"] is None, (
                record["defect"],
                row["reject_reason"],
            )
            assert (row["image_width"], row["image_height"], row["audio_seconds"]) == (32, 32, 1.0)
        assert row["image"] == record["image"] and row["audio"] == record["audio"]  # media are kept
        assert row["clip_score"] is None and row["schema_version"] == 1


@pytest.mark.parametrize(
    "row,config,reason",
    [
        ({"image": png_claiming(100_000, 100_000)}, {}, "decompression bomb"),
        ({"image": png_claiming(10_000, 10_000)}, {}, "over the 64,000,000-pixel limit"),
        ({"image": IMAGE}, {"max_image_pixels": 50}, "over the 50-pixel limit"),
        ({"image": IMAGE}, {"max_image_bytes": 10}, "over max_image_bytes=10"),
        ({"audio": TONE}, {"max_audio_bytes": 10}, "over max_audio_bytes=10"),
        ({"audio": TONE}, {"max_audio_seconds": 0.5}, "1.0 s long, over the 0.5-second limit"),
        ({"image": b""}, {}, "image is empty"),
        ({"image": TONE}, {}, "image could not be decoded"),
        ({"audio": IMAGE}, {}, "audio could not be decoded"),
        ({"audio": TONE[:30]}, {}, "audio could not be decoded"),
        ({}, {}, "sample has no image, caption or audio"),
    ],
    ids=[
        "bomb-pil",
        "bomb-limit",
        "pixels",
        "image-bytes",
        "audio-bytes",
        "audio-seconds",
        "empty-image",
        "audio-as-image",
        "image-as-audio",
        "truncated-audio",
        "nothing",
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_media_is_rejected(row, config, reason):
    (out,) = decode([row], DecodeConfig(**config))
    assert out["reject_stage"] == "decode" and reason in out["reject_reason"]


def test_nan_audio_and_several_problems():
    buffer = io.BytesIO()
    soundfile.write(
        buffer, np.array([0.1, np.nan, 0.2] * 100, np.float32), 16000, format="WAV", subtype="FLOAT"
    )
    (out,) = decode([{"image": b"junk", "caption": " ", "audio": buffer.getvalue()}])
    reasons = out["reject_reason"].split("; ")
    assert len(reasons) == 3 and "NaN" in reasons[1] and "empty" in reasons[2]


@pytest.mark.parametrize(
    "caption,problem",
    [
        ("", "empty"),
        ("  \n\t", "empty"),
        ("red circle\x00\x07\x1b", "3 non-printable"),
        ("caf\ufffd au lait", "non-printable or undecodable"),
        ("https://example.com/images/cat.jpg", "only a URL"),
        ("  <www.example.com/a> ", "only a URL"),
        ("x" * 2001, "over max_caption_chars=2000"),
    ],
)
def test_bad_captions(caption, problem):
    assert problem in caption_problem(caption, max_chars=2000)


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle on grey",
        "一只红色的圆形在灰色背景上",
        "Красный круг на сером фоне",
        "دائرة حمراء على خلفية رمادية",
        "नमस्ते दुनिया",
        "می‌خواهم",  # Persian with a zero-width non-joiner
        "👩‍👩‍👧 family photo",  # emoji joined by zero-width joiners
        "a cat, from https://example.com/cat",
        "line one\nline two\twith a tab",
    ],
)
def test_good_captions_in_any_language(caption):
    assert caption_problem(caption, max_chars=2000) is None
    (out,) = decode([{"caption": caption}])
    assert (
        out["reject_stage"] is None and out["image_width"] is None
    )  # a caption-only sample is fine


def test_rows_rejected_when_read_pass_through():
    (out,) = decode(
        [{"reject_stage": "read", "reject_reason": "shard unreadable from the start: boom"}]
    )
    assert (out["reject_stage"], out["reject_reason"]) == (
        "read",
        "shard unreadable from the start: boom",
    )
    assert out["content_hash"] is None


def test_content_hash_identifies_exact_duplicates():
    rows = [
        {"image": IMAGE, "caption": "a", "audio": TONE},
        {"image": IMAGE, "caption": "a", "audio": TONE},
        {"image": IMAGE, "caption": "b", "audio": TONE},
        {"image": IMAGE, "caption": "", "audio": TONE},
        {"image": IMAGE, "caption": None, "audio": TONE},
        {"image": IMAGE, "caption": None, "audio": None},
    ]
    hashes = [r["content_hash"] for r in decode(rows)]
    assert hashes[0] == hashes[1] and len(set(hashes)) == 5
    assert content_hash(b"ab", None, b"c") != content_hash(b"a", None, b"bc")  # fields are framed


def test_resources_and_config_validation():
    import ray.data

    kwargs = Decode.map_batches_kwargs(
        DecodeConfig(batch_size=16, concurrency=(1, 3), num_cpus=0.5)
    )
    assert (
        kwargs["batch_format"] == "pyarrow"
        and kwargs["batch_size"] == 16
        and kwargs["num_cpus"] == 0.5
    )
    assert isinstance(kwargs["compute"], ray.data.ActorPoolStrategy)
    for concurrency in (None, 2):
        kwargs = Decode.map_batches_kwargs(DecodeConfig(concurrency=concurrency))
        assert isinstance(kwargs["compute"], ray.data.ActorPoolStrategy)
    with pytest.raises(ValidationError, match="max_image_pixels"):
        DecodeConfig(max_image_pixels=0)
    assert Decode()(READ_SAMPLE.empty_table()).schema == SCORED_SAMPLE


def test_sizes_are_checked_before_anything_is_decoded_or_scanned():
    huge_caption = "https://x.io/" + "\x00" * 5000  # junk too, but its length is what is reported
    (out,) = decode([{"image": b"junk", "caption": huge_caption, "audio": b"junk"}])
    assert out["reject_reason"] == "caption is 5,013 characters, over max_caption_chars=2000"
    row = {"image": IMAGE, "caption": "\x00", "audio": TONE}
    (out,) = decode([row], DecodeConfig(max_audio_bytes=10))
    assert out["reject_reason"].startswith("audio is")
    assert out["reject_reason"].endswith("bytes, over max_audio_bytes=10")
    assert ";" not in out["reject_reason"] and out["image_width"] is None  # nothing was decoded
    assert out["content_hash"] is not None  # still identifiable


@pytest.mark.parametrize(
    "flac,config,reason",
    [
        (flac_claiming(frames=2**35), {}, "over the 60-second limit"),  # 24 days; 128 GiB
        (
            flac_claiming(frames=100_000_000, sample_rate=768_000),
            {"max_audio_seconds": 600},
            "over the 64,000,000-sample limit",
        ),
        (flac_claiming(frames=1600, sample_rate=0), {}, "could not be decoded"),
        (flac_claiming(frames=1600, sample_rate=500), {}, "sample rate 500 Hz is outside"),
    ],
    ids=["days", "samples", "rate-zero", "rate-low"],
)
def test_audio_headers_are_checked_before_reading(flac, config, reason):
    start = time.perf_counter()
    (out,) = decode([{"audio": flac}], DecodeConfig(**config))
    assert time.perf_counter() - start < 0.5
    assert out["reject_stage"] == "decode" and reason in out["reject_reason"], out["reject_reason"]


def test_caption_checks_are_linear_in_its_length():
    # 200,000 letters without "://": a URL regex searched over the text retried the scheme at every
    # letter, about 30 s; one pass takes milliseconds.
    for caption in ("a" * 200_000, "a1" * 100_000, "www" * 70_000, ("a" * 63 + " ") * 3000):
        start = time.perf_counter()
        assert caption_problem(caption, max_chars=10**6) is None
        assert time.perf_counter() - start < 1.0, caption[:10]


# The definition of "only a URL" that the one-pass check keeps: delete every URL, and only
# punctuation and ASCII whitespace may remain.
_URL_REFERENCE = re.compile(r"(?:[a-zA-Z][a-zA-Z0-9+.-]*://|www\.)\S+")
_TRIVIAL = " \t\r\n\f\v" + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def test_only_a_url_agrees_with_deleting_urls():
    rng = np.random.default_rng(0)
    alphabet = list("aZw1+.-:/ !(<>_é\u3000\u00a0") + ["://", "www.", "http", " www.", "://x"]
    agreed = {True: 0, False: 0}
    for _ in range(20_000):
        caption = "".join(rng.choice(alphabet, size=rng.integers(1, 12)))
        if not caption.strip():
            continue
        expected = not _URL_REFERENCE.sub("", caption).strip(_TRIVIAL)
        got = caption_problem(caption, max_chars=100) == "caption is only a URL"
        assert got == expected, repr(caption)
        agreed[expected] += 1
    assert min(agreed.values()) > 500  # both outcomes were exercised
