"""Media bytes: round trips and a clear `MediaError` for every kind of bad input."""

import io
import time

import numpy as np
import pytest
from hostile_media import flac_claiming, jpeg, jpeg_scan_bomb, png_claiming, wav_claiming
from PIL import Image

from omniflow.codecs.media import (
    MAX_JPEG_SCANS,
    MediaError,
    decode_audio,
    decode_image,
    encode_audio,
    encode_image,
    fit_length,
    resample,
)

TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_audio_round_trip(fmt):
    wave, rate = decode_audio(encode_audio(TONE, 16000, format=fmt))
    assert rate == 16000 and wave.dtype == np.float32 and wave.shape == TONE.shape
    assert np.abs(wave - TONE).max() < 1e-4  # 16-bit quantisation


def test_stereo_is_mixed_to_mono():
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([TONE, TONE], axis=1), 16000, format="WAV")
    wave, _ = decode_audio(buffer.getvalue())
    assert wave.ndim == 1 and np.abs(wave - TONE).max() < 1e-4


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (encode_audio(TONE, 16000)[:30], "could not be decoded"),
        (b"not audio at all" * 10, "could not be decoded"),
        (encode_image(np.zeros((4, 4, 3), np.uint8)), "could not be decoded"),
        (encode_audio(np.zeros(16000, np.float32), 16000), "silent"),
    ],
    ids=["empty", "truncated", "garbage", "wrong-format", "silence"],
)
def test_bad_audio(data, reason):
    with pytest.raises(MediaError, match=reason):
        decode_audio(data)


def test_nan_audio_is_rejected():
    from omniflow.codecs.media import check_audio

    with pytest.raises(MediaError, match="NaN"):
        check_audio(np.array([0.1, np.nan], np.float32))


def test_resample_keeps_frequency_and_length():
    out = resample(TONE, 16000, 22050)
    assert out.shape == (22050,)
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 22050 / len(out)
    assert abs(peak_hz - 440) < 2
    assert fit_length(out, 100).shape == (100,) and fit_length(out, 30000)[-1] == 0


def test_image_round_trip_and_bad_images():
    pixels = np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(encode_image(pixels))), pixels)
    png = encode_image(pixels)
    for data, reason in ((b"", "empty"), (png[:50], "could not be decoded"), (b"GIF89a" + b"\0" * 20, "could not be decoded")):
        with pytest.raises(MediaError, match=reason):
            decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    big = encode_image(np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(MediaError, match="pixel limit"):
        decode_image(big, max_pixels=10_000)


def test_lying_wav_headers_cost_only_what_the_file_holds():
    # libsndfile counts a WAV's frames from the bytes present, whatever the data chunk claims
    wave, rate = decode_audio(wav_claiming(frames=2**31 - 1))
    assert wave.shape == (100,) and rate == 16_000
    for data, reason in (
        (wav_claiming(frames=100, channels=1025), "could not be decoded"),
        (wav_claiming(frames=100, sample_rate=2**31 - 1), "outside 1,000-768,000 Hz"),
        (wav_claiming(frames=100, sample_rate=1), "outside"),
    ):
        with pytest.raises(MediaError, match=reason):
            decode_audio(data)


@pytest.mark.parametrize(
    "data,limits,reason",
    [
        (flac_claiming(frames=2**36 - 1), {}, "over the 600-second limit"),
        (flac_claiming(frames=10**8, sample_rate=768_000), {}, "over the 64,000,000-sample limit"),
        (encode_audio(TONE, 16000), {"max_seconds": 0.5}, "1.0 s long, over the 0.5-second limit"),
    ],
    ids=["frames", "samples", "seconds"],
)
def test_audio_over_its_header_limits_is_refused_unread(data, limits, reason):
    start = time.perf_counter()
    with pytest.raises(MediaError, match=reason):
        decode_audio(data, **limits)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("orig", [383_987, 767_999, 1_009])
def test_resampling_odd_rates_is_fast_and_nearly_exact(orig):
    wave = np.random.default_rng(0).standard_normal(orig).astype(np.float32)  # one second
    start = time.perf_counter()
    out = resample(wave, orig, 22_050)
    assert time.perf_counter() - start < 1.0  # exact factors (22050 / 383987) took seconds
    assert abs(len(out) - 22_050) <= 1


def test_image_formats_and_jpeg_scan_bombs():
    assert decode_image(jpeg(progressive=True)).size == (64, 64)
    truncated = jpeg(256)
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(truncated[: len(truncated) // 2])
    for fmt in ("GIF", "BMP", "TIFF"):  # only PNG, JPEG and WebP are identified
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format=fmt)
        with pytest.raises(MediaError, match="could not be decoded"):
            decode_image(buffer.getvalue())
    bomb = jpeg_scan_bomb(10_000)  # about 30 s to decode
    start = time.perf_counter()
    with pytest.raises(MediaError, match=f"10,000 scans, over the {MAX_JPEG_SCANS} limit"):
        decode_image(bomb)
    assert time.perf_counter() - start < 0.5


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_count_comes_from_the_header():
    start = time.perf_counter()
    for side in (100_000, 20_000):
        with pytest.raises(MediaError):
            decode_image(png_claiming(side, side))
    assert time.perf_counter() - start < 0.5
