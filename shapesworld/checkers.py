"""Read the concept back from an image, a caption or a waveform; score readings against the truth.

These are ShapesWorld's exact metrics for any-to-any generation: a generated sample is right when
its checker reads the intended concept. Readers return `None` for a field they cannot read (a blank
or noise image, an unparseable caption, a clip with no tone) rather than guess, and work on whole
batches with numpy, thousands of samples per second.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from omniflow.codecs.media import fit_length, resample
from omniflow.codecs.mel import hz_to_mel as _hz_to_mel_torch
from shapesworld.concepts import (
    COLOURS,
    PALETTE,
    PITCH_HZ,
    POSITION_AXES,
    POSITIONS,
    RHYTHMS,
    SHAPES,
    SIZE_RADIUS,
    SIZE_WORDS,
    Concept,
)
from shapesworld.render import shape_coverage


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """The Slaney mel scale of the audio front end, on numpy arrays."""
    return _hz_to_mel_torch(torch.as_tensor(np.asarray(hz, dtype=np.float64))).numpy()


AUDIO_RATE = 16_000  # readers work at this rate and resample other input to it


class Reading(NamedTuple):
    """Per-sample labels read from one modality (None = unreadable); unpacks as `colours, shapes`."""

    colours: list[str | None]
    shapes: list[str | None]

    def concepts(self) -> list[Concept | None]:
        """The concept per sample, `None` where either field is unknown."""
        return [
            Concept(c, s) if c is not None and s is not None else None
            for c, s in zip(self.colours, self.shapes)
        ]


class Layout(NamedTuple):
    """Per-sample size words ("small" / "big") and position names (see `POSITIONS`), or None."""

    sizes: list[str | None]
    positions: list[str | None]


@dataclass(frozen=True)
class CaptionParse:
    """What a caption says; fields it does not state (or contradicts itself on) are None."""

    colour: str | None
    shape: str | None
    size: str | None
    position: str | None


# ---------------------------------------------------------------- images

# Foreground = saturated pixels: the background is neutral grey and every palette colour has a
# chroma (max - min channel) of at least 0.59, so half of the weakest is a safe cut.
CHROMA_CUT = 0.3
MIN_COLOUR_CHROMA = 0.25  # a foreground whose mean colour is greyer than this is noise
MAX_HUE_DISTANCE = 0.4  # normalised palette hues are >= 0.8 apart
MIN_RADIUS = 0.1  # of the canvas side; the smallest rendered shape has 5.5/32 = 0.17
MIN_MATCH = 0.8  # cosine similarity to the best shape template; rendered shapes score > 0.9
# Templates are also compared blurred (Gaussian sigma in pixels), because blur rounds a square's
# corners until, unblurred, it matches a circle better than a square.
TEMPLATE_BLURS = (0.0, 0.8, 1.4)
_SIZE_CUT = (SIZE_RADIUS["small"][1] + SIZE_RADIUS["big"][0]) / 2


def _hue(rgb: np.ndarray) -> np.ndarray:
    """RGB -> (rgb - min) / chroma: unchanged by mixing with grey or scaling the brightness, so
    blurred edges, lighting and background bleed do not move a colour towards another."""
    low = rgb.min(axis=-1, keepdims=True)
    return (rgb - low) / np.maximum(rgb.max(axis=-1, keepdims=True) - low, 1e-6)


_PALETTE_HUES = _hue(np.array([PALETTE[c] for c in COLOURS], dtype=np.float64) / 255)


def _as_image_batch(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> np.ndarray:
    """(N, H, W, 3) float32 in [0, 1] from uint8 / float arrays or PIL images of one size."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im)
                           for im in images])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255
    return np.clip(images.astype(np.float32), 0.0, 1.0)


@dataclass(frozen=True)
class _Foreground:
    """Per-image measurements of the coloured shape; geometry in fractions of the canvas."""

    valid: np.ndarray  # (N,) bool: one plausible single-coloured shape
    colour_idx: np.ndarray  # (N,) int into COLOURS
    shape_idx: np.ndarray  # (N,) int into SHAPES
    radius: np.ndarray  # half the side of the bounding box, as the best template has it
    centre_x: np.ndarray  # bounding-box centre
    centre_y: np.ndarray


# Shape -> (radius^2 per unit area, centroid below the box centre in radii): the areas are pi r^2,
# 4 r^2 and 2 r^2, and a triangle's centroid lies a third of the way up from its base.
_TEMPLATES = {"circle": (1 / np.pi, 0.0), "square": (1 / 4, 0.0), "triangle": (1 / 2, 1 / 3)}


def _masked_mean(x_NHWC: np.ndarray, mask_NHW: np.ndarray) -> np.ndarray:
    """(N, C) mean colour of the masked pixels of each image (0 where none)."""
    return (x_NHWC * mask_NHW[..., None]).sum((1, 2)) / np.maximum(mask_NHW.sum((1, 2)), 1)[:, None]


def _foreground(images: np.ndarray | Sequence) -> _Foreground:
    """Find the saturated blob, name its colour by hue and its shape by template matching.

    Pixels are weighed softly (0 = background colour, 1 = the blob's core colour), so blur, noise,
    JPEG and resizing keep the blob's area and centroid; each candidate shape is then drawn with
    that area and centroid (sharp and blurred) and the most similar (cosine) wins. This is far
    steadier than a thresholded bounding box, whose edges move a pixel with every blur.
    """
    x_NHWC = _as_image_batch(images)
    n, height, width, _ = x_NHWC.shape
    side = min(height, width)
    chroma_NHW = x_NHWC.max(-1) - x_NHWC.min(-1)
    mask_NHW = chroma_NHW > CHROMA_CUT
    # Drop isolated specks (a noise pixel over the cut) so they count for nothing.
    neighbours = ndimage.convolve(mask_NHW.astype(np.int8), np.ones((1, 3, 3), np.int8),
                                  mode="constant") - mask_NHW
    mask_NHW &= neighbours >= 2
    count_N = mask_NHW.sum((1, 2))

    mean_NC = _masked_mean(x_NHWC, mask_NHW)
    mean_chroma_N = mean_NC.max(-1) - mean_NC.min(-1)
    hue_dist_NK = np.linalg.norm(_hue(mean_NC)[:, None, :] - _PALETTE_HUES[None], axis=-1)

    # Soft weight: the pixel's colour projected on the line from the background colour (0) to the
    # blob's core colour (1), so luminance counts too (JPEG keeps it sharper than chroma).
    flat_chroma = np.where(mask_NHW, chroma_NHW, -1.0).reshape(n, -1)
    ranked = -np.sort(-flat_chroma, axis=1)
    median_N = ranked[np.arange(n), np.minimum(count_N // 2, ranked.shape[1] - 1)]
    core_NHW = mask_NHW & (chroma_NHW >= median_N[:, None, None])
    near_NHW = ndimage.binary_dilation(mask_NHW, np.ones((1, 3, 3), bool), iterations=2)
    core_NC = _masked_mean(x_NHWC, core_NHW)
    background_NC = _masked_mean(x_NHWC, ~near_NHW)
    direction_NC = core_NC - background_NC
    offset_NHWC = x_NHWC - background_NC[:, None, None, :]
    length2_N = np.maximum((direction_NC**2).sum(1), 1e-6)
    projection_NHW = np.einsum("nhwc,nc->nhw", offset_NHWC, direction_NC) / length2_N[:, None, None]
    weight_NHW = near_NHW * np.clip(projection_NHW, 0.0, 1.0)
    area_N = weight_NHW.sum((1, 2))
    safe_area = np.maximum(area_N, 1e-6)[:, None, None]
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    mx_N = (weight_NHW * xs[None, None, :]).sum((1, 2)) / safe_area[:, 0, 0]
    my_N = (weight_NHW * ys[None, :, None]).sum((1, 2)) / safe_area[:, 0, 0]

    w_norm = np.sqrt((weight_NHW**2).sum((1, 2))) + 1e-9
    scores, radii, centres_y = [], [], []
    for shape in SHAPES:
        r2_per_area, centroid_drop = _TEMPLATES[shape]
        r_N = np.sqrt(area_N * r2_per_area)
        cy_N = my_N - centroid_drop * r_N
        dx = xs[None, None, :] - mx_N[:, None, None]
        dy = ys[None, :, None] - cy_N[:, None, None]
        sharp_NHW = shape_coverage(shape, dx, dy, r_N[:, None, None])
        best_N = np.zeros(n)
        for blur in TEMPLATE_BLURS:
            cover_NHW = ndimage.gaussian_filter(sharp_NHW, (0, blur, blur), mode="constant")
            c_norm = np.sqrt((cover_NHW**2).sum((1, 2))) + 1e-9
            best_N = np.maximum(best_N, (weight_NHW * cover_NHW).sum((1, 2)) / (w_norm * c_norm))
        scores.append(best_N)
        radii.append(r_N)
        centres_y.append(cy_N)
    scores_NS = np.stack(scores, axis=1)
    shape_idx = scores_NS.argmax(1)
    pick = np.arange(n), shape_idx
    radius_N = np.stack(radii, axis=1)[pick]

    valid = (
        (count_N > 0)
        & (mean_chroma_N >= MIN_COLOUR_CHROMA)
        & (hue_dist_NK.min(1) <= MAX_HUE_DISTANCE)
        & (radius_N >= MIN_RADIUS * side)
        & (scores_NS.max(1) >= MIN_MATCH)
    )
    return _Foreground(
        valid=valid,
        colour_idx=hue_dist_NK.argmin(1),
        shape_idx=shape_idx,
        radius=radius_N / side,
        centre_x=mx_N / width,
        centre_y=np.stack(centres_y, axis=1)[pick] / height,
    )


def read_image(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> Reading:
    """Colour (nearest palette hue of the foreground) and shape (best-matching template) per image.

    `images`: (N, H, W, 3) uint8, or floats in [0, 1], or a sequence of same-size arrays / PIL
    images. An image without one plausible coloured shape (blank, noise) reads (None, None).

        >>> from shapesworld.concepts import Concept, sample_scenes
        >>> from shapesworld.render import render_images
        >>> read_image(render_images(sample_scenes([Concept("red", "circle")], seed=0)))
        Reading(colours=['red'], shapes=['circle'])
    """
    fg = _foreground(images)
    colours = [COLOURS[c] if ok else None for c, ok in zip(fg.colour_idx, fg.valid)]
    shapes = [SHAPES[s] if ok else None for s, ok in zip(fg.shape_idx, fg.valid)]
    return Reading(colours, shapes)


def read_layout(images: np.ndarray | Sequence[np.ndarray | Image.Image]) -> Layout:
    """Size word and position name of the shape in each image (None where no shape is found).

    Size from the radius of the best-matching template; position from the shape's gaps to the
    canvas edges on each axis, the inverse of how scenes place it.
    """
    fg = _foreground(images)
    gap_x = [fg.centre_x - fg.radius, 1 - fg.centre_x - fg.radius]
    gap_y = [fg.centre_y - fg.radius, 1 - fg.centre_y - fg.radius]
    by_axes = {axes: name for name, axes in POSITION_AXES.items()}
    horizontal, vertical = _axis_band(*gap_x), _axis_band(*gap_y)
    sizes, positions = [], []
    for ok, r, h, v in zip(fg.valid, fg.radius, horizontal, vertical):
        sizes.append(("big" if r > _SIZE_CUT else "small") if ok else None)
        positions.append(by_axes[(v, h)] if ok else None)
    return Layout(sizes, positions)


def _axis_band(low_gap: np.ndarray, high_gap: np.ndarray) -> list[str]:
    """Gaps to both edges along one axis -> "low" / "mid" / "high". Scenes put the centre in the
    outer or middle fifths of its free range, so cutting the gap ratio in thirds separates them
    with room for pixel rounding (the margin only pulls ratios towards the middle)."""
    low_gap, high_gap = np.maximum(low_gap, 0.0), np.maximum(high_gap, 0.0)
    ratio = low_gap / np.maximum(low_gap + high_gap, 1e-9)
    return [("low", "mid", "high")[i] for i in np.digitize(ratio, [1 / 3, 2 / 3])]


# ---------------------------------------------------------------- captions

_COLOUR_WORDS = {c: c for c in COLOURS}
_SHAPE_WORDS = {
    "circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
    "square": "square", "squares": "square",
    "triangle": "triangle", "triangles": "triangle",
}
_SIZE_WORDS = {w: size for size, words in SIZE_WORDS.items() for w in words} | {"huge": "big"}
_VERTICAL_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL_WORDS = {"left": "left", "right": "right"}
_MIDDLE_WORDS = {"middle", "centre", "center"}


def _one(tokens: list[str], vocabulary: dict[str, str]) -> str | None:
    """The single value the tokens name from a vocabulary; None if none or several."""
    found = {vocabulary[t] for t in tokens if t in vocabulary}
    return found.pop() if len(found) == 1 else None


def parse_caption(text: object) -> CaptionParse:
    """What a caption says, tolerant of case, punctuation and plurals; a non-string parses to Nones.

        >>> parse_caption("There is a BIG red square, on the left!")
        CaptionParse(colour='red', shape='square', size='big', position='left')
    """
    if not isinstance(text, str):
        return CaptionParse(None, None, None, None)
    tokens = re.findall(r"[a-z]+", text.lower())
    vertical, horizontal = _one(tokens, _VERTICAL_WORDS), _one(tokens, _HORIZONTAL_WORDS)
    if vertical or horizontal:
        position = " ".join(w for w in (vertical, horizontal) if w)
    else:
        position = "middle" if _MIDDLE_WORDS.intersection(tokens) else None
    return CaptionParse(
        colour=_one(tokens, _COLOUR_WORDS),
        shape=_one(tokens, _SHAPE_WORDS),
        size=_one(tokens, _SIZE_WORDS),
        position=position if position in POSITIONS else None,
    )


def read_caption(texts: Sequence[object]) -> Reading:
    """Colour and shape per caption (None where it names none or several).

        >>> read_caption(["A small red circle.", "blue thing", None])
        Reading(colours=['red', 'blue', None], shapes=['circle', None, None])
    """
    parses = [parse_caption(t) for t in texts]
    return Reading([p.colour for p in parses], [p.shape for p in parses])


# ---------------------------------------------------------------- audio

PITCH_BAND_HZ = (150.0, 2600.0)  # searched for the fundamental (palette: 300-2000 Hz)
_PALETTE_MELS = hz_to_mel(np.array([PITCH_HZ[c] for c in COLOURS]))
MAX_MEL_ERROR = 0.4 * np.diff(np.sort(_PALETTE_MELS)).min()  # else the pitch is "not ours"
MIN_PROMINENCE = 10.0  # tone peak over the median of the band; white noise gives ~2
_SMOOTH_HZ = 21  # spectral smoothing: a mel round trip spreads a tone over tens of Hz
_FRAME = 160  # 10 ms hop at 16 kHz, as AudioLDM2's STFT
# A frame is sounding when its envelope is above NOTE_LEVEL of the clip's typical note level (the
# median over frames above a tenth of the peak): unlike the peak, that ignores the onset spikes
# Griffin-Lim puts on a note, which would otherwise push a held note's body under the cut.
NOTE_LEVEL = 0.4
MIN_NOTE_FRAMES = 3  # shorter blips / gaps are ignored
_SMOOTH_FRAMES = 5  # envelope smoothing, so a flickering note (a noisy generator) stays one note
MIN_HELD_S = 0.4  # a single note must be held this long to be a circle
_SHAPE_BY_COUNT = {r.count: shape for shape, r in RHYTHMS.items()}
CLIP_RUN = 3  # this many equal samples in a row at high level are a flat top
CLIP_FRACTION = 0.01


def _as_wave_batch(waves: np.ndarray | Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    """(N, T) float64 at AUDIO_RATE from a 2-D array or a sequence of 1-D clips (padded)."""
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000 Hz, got {sample_rate}")
    if isinstance(waves, np.ndarray) and waves.ndim != 2:
        raise ValueError(f"waves must be (N, T) or a sequence of 1-D clips, got {waves.shape}")
    clips = [resample(np.asarray(w, dtype=np.float32), sample_rate, AUDIO_RATE) for w in waves]
    if any(c.ndim != 1 for c in clips):
        raise ValueError("each clip must be a 1-D mono waveform")
    if not clips:
        return np.zeros((0, 0))
    length = max(c.shape[0] for c in clips)
    return np.stack([fit_length(c, length) for c in clips]).astype(np.float64)


def _moving_sum(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving sum along the last axis (same length, zero beyond the edges)."""
    return ndimage.uniform_filter1d(x, width, axis=-1, mode="constant") * width


def read_audio(waves: np.ndarray | Sequence[np.ndarray], sample_rate: int = AUDIO_RATE) -> Reading:
    """Colour from the fundamental (nearest palette pitch on the mel scale) and shape from the
    number of notes (1 held: circle, 3: triangle, 4: square), per clip.

    `waves`: (N, T) or a sequence of 1-D mono clips at `sample_rate` (resampled to 16 kHz). A clip
    without a clear tone reads (None, None); an unexpected note count reads shape None.

        >>> from shapesworld.concepts import Concept, sample_scenes
        >>> from shapesworld.render import render_audio
        >>> read_audio(render_audio(sample_scenes([Concept("red", "circle")], seed=0)))
        Reading(colours=['red'], shapes=['circle'])
    """
    x_NT = _as_wave_batch(waves, sample_rate)
    n, length = x_NT.shape
    if n == 0:
        return Reading([], [])
    if length < AUDIO_RATE // 4:
        raise ValueError(f"clips must last at least 0.25 s, got {length / AUDIO_RATE:.3f} s")

    # Fundamental: the strongest smoothed peak in the band (harmonics are always weaker).
    freqs = np.fft.rfftfreq(length, 1 / AUDIO_RATE)
    band = (freqs >= PITCH_BAND_HZ[0]) & (freqs <= PITCH_BAND_HZ[1])
    hz_per_bin = AUDIO_RATE / length
    power_NF = np.abs(np.fft.rfft(x_NT, axis=1)[:, band]) ** 2
    smooth_NF = _moving_sum(power_NF, max(1, round(_SMOOTH_HZ / hz_per_bin)))
    peak = smooth_NF.argmax(1)
    prominence = smooth_NF[np.arange(n), peak] / np.maximum(np.median(smooth_NF, axis=1), 1e-30)
    mel_error_NK = np.abs(hz_to_mel(freqs[band][peak])[:, None] - _PALETTE_MELS[None])
    colour_idx = mel_error_NK.argmin(1)
    is_tone = prominence >= MIN_PROMINENCE
    colour_ok = is_tone & (mel_error_NK.min(1) <= MAX_MEL_ERROR)

    # Notes: runs of 10 ms frames whose RMS (above the clip's floor) is near its note level.
    frames = length // _FRAME
    rms_NF = np.sqrt((x_NT[:, : frames * _FRAME].reshape(n, frames, _FRAME) ** 2).mean(-1))
    rms_NF = ndimage.uniform_filter1d(rms_NF, _SMOOTH_FRAMES, axis=1, mode="nearest")
    env_NF = rms_NF - np.percentile(rms_NF, 5, axis=1, keepdims=True)
    active_NF = env_NF > 0.1 * env_NF.max(1, keepdims=True)
    active_NF[np.arange(n), env_NF.argmax(1)] = True  # never empty, even for silence
    level_N1 = np.nanmedian(np.where(active_NF, env_NF, np.nan), axis=1, keepdims=True)
    on_NF = env_NF > NOTE_LEVEL * np.maximum(level_N1, 1e-12)
    structure = np.ones((1, MIN_NOTE_FRAMES), bool)
    on_NF = ndimage.binary_opening(ndimage.binary_closing(on_NF, structure), structure)
    onsets_N = (on_NF[:, 0].astype(int) + (on_NF[:, 1:] & ~on_NF[:, :-1]).sum(1))
    held_N = on_NF.sum(1) * _FRAME / AUDIO_RATE

    colours, shapes = [], []
    for i in range(n):
        shape = _SHAPE_BY_COUNT.get(int(onsets_N[i]))
        if shape == "circle" and held_N[i] < MIN_HELD_S:
            shape = None
        colours.append(COLOURS[colour_idx[i]] if colour_ok[i] else None)
        shapes.append(shape if is_tone[i] else None)
    return Reading(colours, shapes)


def is_clipped(waves: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N,) bool: clips with flat tops, i.e. over 1% of samples in runs of 3+ equal values at more
    than half the clip's peak. Catches clipping at any level (also after later rescaling), while a
    clean tone, even 16-bit quantised, almost never repeats a sample near its peak.
    """
    flags = []
    for wave in waves:
        w = np.asarray(wave, dtype=np.float32)
        if w.size < CLIP_RUN:
            flags.append(False)
            continue
        high = np.abs(w) > 0.5 * np.abs(w).max()
        same = w[1:] == w[:-1]
        flat = same[1:] & same[:-1] & high[2:]
        flags.append(bool(flat.mean() > CLIP_FRACTION))
    return np.array(flags, dtype=bool)


# ---------------------------------------------------------------- scoring

def concept_accuracy(
    pred: Reading | Sequence[Concept | None], truth: Reading | Sequence[Concept]
) -> dict[str, float]:
    """Fractions right: colour, shape, both, and the fraction with any field unknown.

        >>> concept_accuracy(Reading(["red", None], ["circle", "square"]),
        ...                  [Concept("red", "circle"), Concept("blue", "square")])
        {'colour': 0.5, 'shape': 1.0, 'both': 0.5, 'unknown': 0.5}
    """
    pc, ps = _labels(pred)
    tc, ts = _labels(truth)
    if len(pc) != len(tc):
        raise ValueError(f"pred has {len(pc)} samples but truth has {len(tc)}")
    if not tc:
        raise ValueError("cannot score an empty batch")
    colour_ok = np.array([p is not None and p == t for p, t in zip(pc, tc)])
    shape_ok = np.array([p is not None and p == t for p, t in zip(ps, ts)])
    unknown = np.array([c is None or s is None for c, s in zip(pc, ps)])
    return {
        "colour": float(colour_ok.mean()),
        "shape": float(shape_ok.mean()),
        "both": float((colour_ok & shape_ok).mean()),
        "unknown": float(unknown.mean()),
    }


def _labels(x: Reading | Sequence[Concept | None]) -> tuple[list, list]:
    if isinstance(x, Reading):
        return list(x.colours), list(x.shapes)
    return [c.colour if c else None for c in x], [c.shape if c else None for c in x]
