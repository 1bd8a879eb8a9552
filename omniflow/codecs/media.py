"""Decoding and encoding media bytes, with clear errors for bad input.

Every failure raises `MediaError` (a `ValueError`) whose message says what is wrong, so a data job
can put it in a rejects row and a service can answer 4xx with it.
"""

import io
import re

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

SILENCE_PEAK = 1e-4  # a clip whose absolute peak is below this carries no signal
MAX_IMAGE_PIXELS = 64_000_000  # larger claims are treated as decompression bombs


class MediaError(ValueError):
    """Media that cannot be used, with the reason."""


def _reason(err: Exception) -> str:
    """A library's error message without object reprs such as `<_io.BytesIO object at 0x...>`."""
    return re.sub(r"<[^<>]*>:?\s*", "", str(err)).strip() or type(err).__name__


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """WAV / FLAC (or any libsndfile format) bytes -> (mono float32 waveform, sample rate)."""
    if not data:
        raise MediaError("audio is empty (0 bytes)")
    try:
        wave, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise MediaError(f"audio could not be decoded as WAV/FLAC: {_reason(err)}") from None
    return check_audio(wave.mean(axis=1)), int(sample_rate)


def check_audio(wave: np.ndarray) -> np.ndarray:
    """Reject empty, non-finite or silent waveforms; return the waveform unchanged."""
    if wave.size == 0:
        raise MediaError("audio has no samples")
    if not np.isfinite(wave).all():
        raise MediaError("audio contains NaN or infinite samples")
    if np.abs(wave).max() < SILENCE_PEAK:
        raise MediaError(f"audio is silent (peak below {SILENCE_PEAK})")
    return wave


def encode_audio(wave: np.ndarray, sample_rate: int, *, format: str = "WAV") -> bytes:
    """Mono float waveform in [-1, 1] -> WAV (16-bit PCM) or FLAC bytes."""
    if format not in ("WAV", "FLAC"):
        raise ValueError(f"format must be 'WAV' or 'FLAC', got {format!r}")
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(wave, -1.0, 1.0), sample_rate, format=format, subtype="PCM_16")
    return buffer.getvalue()


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling between integer rates (anti-aliased)."""
    if orig_rate == target_rate:
        return wave
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(orig_rate, target_rate)
    return resample_poly(wave, target_rate // g, orig_rate // g).astype(np.float32)


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Crop to `length` samples or zero-pad at the end."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])]
    return np.pad(wave, pad)


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """PNG / JPEG / WebP bytes -> RGB PIL image, refusing truncated files and decompression bombs."""
    if not data:
        raise MediaError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise MediaError(f"image is {width}x{height}, over the {max_pixels:,}-pixel limit")
            probe.load()
            image = probe.convert("RGB")
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MediaError(f"image could not be decoded: {_reason(err)}") from None
    if width == 0 or height == 0:
        raise MediaError("image has zero size")
    return image


def encode_image(image: Image.Image | np.ndarray, *, format: str = "PNG") -> bytes:
    """PIL image or HxWx3 uint8 array -> PNG / JPEG / WEBP bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()
