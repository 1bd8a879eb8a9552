"""Media bytes: round trips and a clear `MediaError` for every kind of bad input."""

import numpy as np
import pytest

from omniflow.codecs.media import (
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
