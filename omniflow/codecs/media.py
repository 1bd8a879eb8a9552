"""Decoding and encoding media bytes, with clear errors for bad input.

Every failure raises `MediaError` (a `ValueError`) whose message says what is wrong, so a data job
can put it in a rejects row and a service can answer 4xx with it.

Decoding is bounded by what the file's header claims, checked before any sample or pixel is
decoded: an image's width x height (`max_pixels`) and, for JPEG, its number of scans; audio's
duration (`max_seconds`), frames x channels (`MAX_AUDIO_SAMPLES`) and sample rate. So the work
and memory one file can cost are capped whatever its bytes say.
"""

import io
import re
from fractions import Fraction

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

SILENCE_PEAK = 1e-4  # a clip whose absolute peak is below this carries no signal
MAX_IMAGE_PIXELS = 64_000_000  # larger claims are treated as decompression bombs
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's other plugins are never tried on untrusted bytes
# Each scan of a progressive JPEG passes over the whole image, so a small file with thousands of
# scans costs minutes; encoders write about 10.
MAX_JPEG_SCANS = 100
MAX_AUDIO_SECONDS = 600.0
MAX_AUDIO_SAMPLES = 64_000_000  # frames x channels, about 256 MB as float32
SAMPLE_RATES = (1_000, 768_000)  # Hz, inclusive
# resample's polyphase filter has about 20 x max(up, down) taps; odd rates are approximated so that
# neither factor exceeds this (a rate error of a few parts per million at most).
MAX_RESAMPLE_FACTOR = 4096


class MediaError(ValueError):
    """Media that cannot be used, with the reason."""


def _reason(err: Exception) -> str:
    """A library's error message without object reprs such as `<_io.BytesIO object at 0x...>`."""
    return re.sub(r"<[^<>]*>:?\s*", "", str(err)).strip() or type(err).__name__


def decode_audio(data: bytes, *, max_seconds: float = MAX_AUDIO_SECONDS) -> tuple[np.ndarray, int]:
    """WAV / FLAC (or any libsndfile format) bytes -> (mono float32 waveform, sample rate).

    The header's sample rate, channels and length are checked before any sample is read: a clip
    longer than `max_seconds` or over `MAX_AUDIO_SAMPLES` is refused unread.
    """
    if not data:
        raise MediaError("audio is empty (0 bytes)")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            _check_audio_header(f.frames, f.channels, f.samplerate, max_seconds=max_seconds)
            # at most the header's frame count: memory stays within what was checked
            wave = f.read(frames=f.frames, dtype="float32", always_2d=True)
            sample_rate = f.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise MediaError(f"audio could not be decoded as WAV/FLAC: {_reason(err)}") from None
    return check_audio(wave.mean(axis=1)), int(sample_rate)


def _check_audio_header(
    frames: int, channels: int, sample_rate: int, *, max_seconds: float
) -> None:
    low, high = SAMPLE_RATES
    if not low <= sample_rate <= high:
        raise MediaError(f"audio sample rate {sample_rate:,} Hz is outside {low:,}-{high:,} Hz")
    seconds = frames / sample_rate
    if seconds > max_seconds:
        raise MediaError(f"audio is {seconds:.1f} s long, over the {max_seconds:g}-second limit")
    if frames * channels > MAX_AUDIO_SAMPLES:
        raise MediaError(
            f"audio has {frames:,} frames x {channels} channels, "
            f"over the {MAX_AUDIO_SAMPLES:,}-sample limit"
        )


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
    """Polyphase resampling between integer rates (anti-aliased).

    Exact for rates whose reduced ratio has factors up to `MAX_RESAMPLE_FACTOR` (every common pair,
    e.g. 44100 -> 16000 is 160 / 441); a rarer ratio is replaced by the nearest one within that
    bound, which keeps the filter small."""
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    if orig_rate == target_rate:
        return wave
    from scipy.signal import resample_poly

    up, down = _resample_factors(orig_rate, target_rate)
    return resample_poly(wave, up, down).astype(np.float32)


def _resample_factors(orig_rate: int, target_rate: int) -> tuple[int, int]:
    """(up, down), both at most MAX_RESAMPLE_FACTOR, with up / down closest to target / orig."""
    ratio = Fraction(target_rate, orig_rate)
    if ratio > 1:  # bound `up`, the denominator of the inverse
        inverse = max(
            (1 / ratio).limit_denominator(MAX_RESAMPLE_FACTOR), Fraction(1, MAX_RESAMPLE_FACTOR)
        )
        return inverse.denominator, inverse.numerator
    ratio = max(ratio.limit_denominator(MAX_RESAMPLE_FACTOR), Fraction(1, MAX_RESAMPLE_FACTOR))
    return ratio.numerator, ratio.denominator


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Crop to `length` samples or zero-pad at the end."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])]
    return np.pad(wave, pad)


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """PNG / JPEG / WebP bytes -> RGB PIL image, refusing truncated files and decompression bombs.

    Only the header is read before the checks: width x height against `max_pixels`, and a JPEG's
    number of scans (`MAX_JPEG_SCANS`)."""
    if not data:
        raise MediaError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise MediaError(f"image is {width}x{height}, over the {max_pixels:,}-pixel limit")
            if probe.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with more pictures after it
                _check_jpeg_scans(data)
            probe.load()
            image = probe.convert("RGB")
    except MediaError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        raise MediaError(f"image could not be decoded: {_reason(err)}") from None
    if width == 0 or height == 0:
        raise MediaError("image has zero size")
    return image


def _check_jpeg_scans(data: bytes) -> None:
    # Entropy-coded data stuffs every 0xFF with 0x00, so FF DA only occurs as a start-of-scan marker
    # (an embedded thumbnail's scans count too; they are few).
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise MediaError(f"JPEG has {scans:,} scans, over the {MAX_JPEG_SCANS} limit")


def encode_image(image: Image.Image | np.ndarray, *, format: str = "PNG") -> bytes:
    """PIL image or HxWx3 uint8 array -> PNG / JPEG / WEBP bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()
