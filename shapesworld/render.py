"""Render scenes into the three modalities: RGB images, English captions, mono waveforms.

Each renderer is a pure function of the scenes (their `seed` drives the per-sample noise and word
choices), vectorised over the batch with numpy.
"""

from collections.abc import Sequence

import numpy as np

from shapesworld.concepts import (
    CAPTION_TEMPLATES,
    COLOURS,
    HARMONICS,
    PALETTE,
    PITCH_HZ,
    POSITION_PHRASES,
    RHYTHMS,
    SHAPES,
    SIZE_WORDS,
    Scene,
)

SAMPLE_RATE = 16_000  # AudioLDM2's rate
DURATION_S = 1.0
IMAGE_SIZE = 32
COLOUR_JITTER = 12 / 255  # per-channel shade variation of the shape's colour
RAMP_S = 0.01  # attack / release of every note, so notes do not click
_MAX_HARMONIC = max(h for partials in HARMONICS.values() for h in partials)
_CHUNK = 64  # clips per vectorised audio block (keeps each array a few MB)

# Streams of a scene's seed, one per use, so adding a use never changes the others.
_PIXEL_NOISE, _SHADE, _WORDS, _HISS, _PHASE = range(5)


def _scene_rng(scene: Scene, stream: int) -> np.random.Generator:
    return np.random.default_rng([scene.seed, stream])


def _field(scenes: Sequence[Scene], name: str) -> np.ndarray:
    return np.array([getattr(s, name) for s in scenes], dtype=np.float64)


def _check_size(size: int) -> None:
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels for the shapes to stay readable, got {size}")


def _pixel_noise(scenes: Sequence[Scene], size: int) -> np.ndarray:
    """(N, H, W, 3) float: each scene's Gaussian pixel noise, at its own level."""
    unit = [_scene_rng(s, _PIXEL_NOISE).standard_normal((size, size, 3)) for s in scenes]
    noise_NHWC = np.stack(unit) if unit else np.zeros((0, size, size, 3))
    return noise_NHWC * _field(scenes, "pixel_noise")[:, None, None, None]


def _greys(scenes: Sequence[Scene]) -> np.ndarray:
    """(N, 1, 1, 1) background grey levels, to broadcast over images."""
    return _field(scenes, "background")[:, None, None, None]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def render_backgrounds(scenes: Sequence[Scene], *, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8: the scenes' backgrounds with no shape (a "blank" image)."""
    _check_size(size)
    return _to_uint8(_greys(scenes) + _pixel_noise(scenes, size))


def shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a pixel at offset (dx, dy) from a shape's centre.

    All shapes share the bounding box centre +- radius: a circle of that radius, the square that
    fills the box and the upward triangle whose base is the box's bottom edge, so they differ in
    how much of the box they fill (pi/4, 1, 1/2). Coverage is 1/2 - signed distance (all in pixels),
    clipped: a one-pixel ramp across the edge. The checkers draw their templates with this too.
    """
    if shape == "circle":
        distance = np.sqrt(dx**2 + dy**2) - radius
    elif shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - radius
    elif shape == "triangle":  # the base edge and the two slanted edges (slope 2)
        distance = np.maximum(dy - radius, (2 * np.abs(dx) - dy - radius) / np.sqrt(5))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def coverage_maps(scenes: Sequence[Scene], *, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size) float in [0, 1]: how much of each pixel each scene's shape covers."""
    _check_size(size)
    centres = np.arange(size) + 0.5
    r = size * _field(scenes, "radius")[:, None, None]
    dx_N1W = centres[None, None, :] - size * _field(scenes, "centre_x")[:, None, None]
    dy_NH1 = centres[None, :, None] - size * _field(scenes, "centre_y")[:, None, None]
    shape_N11 = np.array([s.concept.shape for s in scenes])[:, None, None]
    coverage_NHW = np.zeros((len(scenes), size, size))
    for shape in SHAPES:
        coverage_NHW = np.where(shape_N11 == shape, shape_coverage(shape, dx_N1W, dy_NH1, r),
                                coverage_NHW)
    return coverage_NHW


def render_images(scenes: Sequence[Scene], *, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 RGB: one anti-aliased shape of the concept's colour on noisy grey.

        >>> from shapesworld.concepts import sample_concepts, sample_scenes
        >>> render_images(sample_scenes(sample_concepts(2, seed=0), seed=0)).shape
        (2, 32, 32, 3)
    """
    coverage_NHW1 = coverage_maps(scenes, size=size)[..., None]
    palette = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64) / 255
    colour_NC = palette[[COLOURS.index(s.concept.colour) for s in scenes]].reshape(-1, 3)
    shade_NC = np.array([_scene_rng(s, _SHADE).uniform(-1, 1, 3) for s in scenes]).reshape(-1, 3)
    colour_NC = colour_NC + COLOUR_JITTER * shade_NC
    grey = _greys(scenes)
    clean_NHWC = grey + coverage_NHW1 * (colour_NC[:, None, None, :] - grey)
    return _to_uint8(clean_NHWC + _pixel_noise(scenes, size))


def render_captions(scenes: Sequence[Scene]) -> list[str]:
    """One English caption per scene from its template; size and position words match the render.

        >>> from shapesworld.concepts import Concept, sample_scenes
        >>> caption = render_captions(sample_scenes([Concept("red", "circle")], seed=0))[0]
        >>> "red" in caption and "circle" in caption
        True
    """
    captions = []
    for scene in scenes:
        rng = _scene_rng(scene, _WORDS)
        sizes, wheres = SIZE_WORDS[scene.size], POSITION_PHRASES[scene.position]
        where = wheres[rng.integers(len(wheres))]
        captions.append(
            CAPTION_TEMPLATES[scene.template].format(
                colour=scene.concept.colour,
                shape=scene.concept.shape,
                size=sizes[rng.integers(len(sizes))],
                where=where,
                Where=where[0].upper() + where[1:],
            )
        )
    return captions


def render_audio(
    scenes: Sequence[Scene], *, sample_rate: int = SAMPLE_RATE, duration_s: float = DURATION_S
) -> np.ndarray:
    """(N, T) float32 in [-1, 1]: the colour as pitch, the shape as rhythm (and timbre).

    A note sequence at the colour's fundamental (detuned by the scene), with the shape's harmonics
    (those below 0.45 * sample_rate) and rhythm, starting at the scene's onset, over a faint hiss.

        >>> from shapesworld.concepts import sample_concepts, sample_scenes
        >>> render_audio(sample_scenes(sample_concepts(2, seed=0), seed=0)).shape
        (2, 16000)
    """
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000 Hz to carry the pitches, got {sample_rate}")
    latest_end = max((s.onset_s + RHYTHMS[s.concept.shape].duration_s * s.tempo for s in scenes),
                     default=0.0)
    if duration_s < latest_end:
        raise ValueError(f"duration_s={duration_s} cuts notes that last until {latest_end:.2f} s")
    length = round(duration_s * sample_rate)
    blocks = [
        _render_audio_block(scenes[i : i + _CHUNK], sample_rate, length)
        for i in range(0, len(scenes), _CHUNK)
    ]
    return np.concatenate(blocks) if blocks else np.zeros((0, length), np.float32)


def _render_audio_block(scenes: Sequence[Scene], sample_rate: int, length: int) -> np.ndarray:
    # float32 throughout (after reducing the phase mod one cycle): the block is memory-bound.
    f32 = np.float32
    t_1T = (np.arange(length) / sample_rate)[None, :]
    f0_N1 = np.array([PITCH_HZ[s.concept.colour] for s in scenes])[:, None]
    f0_N1 = f0_N1 * 2 ** (_field(scenes, "detune_cents")[:, None] / 1200)

    # Harmonic amplitudes (N, K) for harmonic numbers 1..K, dropping those near Nyquist.
    numbers_K = np.arange(1, _MAX_HARMONIC + 1)
    amps_NK = np.array(
        [[HARMONICS[s.concept.shape].get(h, 0.0) for h in numbers_K] for s in scenes]
    )
    amps_NK = np.where(numbers_K[None, :] * f0_N1 < 0.45 * sample_rate, amps_NK, 0.0)
    amps_NK = (amps_NK / amps_NK.sum(axis=1, keepdims=True)).astype(f32)  # tone peak <= 1
    phase_N1 = np.array([_scene_rng(s, _PHASE).uniform(0, 2 * np.pi) for s in scenes])[:, None]
    theta_NT = (2 * np.pi * ((f0_N1 * t_1T) % 1.0) + phase_N1).astype(f32)
    # sin(h theta) for h = 1..K by the Chebyshev recurrence: two transcendental calls, not K.
    twice_cos_NT = 2 * np.cos(theta_NT)
    previous_NT, current_NT = np.zeros_like(theta_NT), np.sin(theta_NT)
    tone_NT = amps_NK[:, :1] * current_NT
    for k in range(1, int(np.flatnonzero(amps_NK.any(0)).max()) + 1):
        previous_NT, current_NT = current_NT, twice_cos_NT * current_NT - previous_NT
        tone_NT += amps_NK[:, k : k + 1] * current_NT

    # Note envelope: `count` notes of `on_s` every `on_s + off_s`, time-stretched by the tempo.
    rhythms = [RHYTHMS[s.concept.shape] for s in scenes]
    count_N1, on_N1, off_N1 = (
        np.array([getattr(r, f) for r in rhythms], dtype=f32)[:, None]
        for f in ("count", "on_s", "off_s")
    )
    onset_N1, tempo_N1 = (_field(scenes, f).astype(f32)[:, None] for f in ("onset_s", "tempo"))
    local_NT = (t_1T.astype(f32) - onset_N1) / tempo_N1
    note_NT = np.floor(local_NT / (on_N1 + off_N1))
    within_NT = local_NT - note_NT * (on_N1 + off_N1)
    sounding_NT = (local_NT >= 0) & (note_NT < count_N1) & (within_NT < on_N1)
    edge_NT = np.clip(np.minimum(within_NT, on_N1 - within_NT) / f32(RAMP_S), 0.0, 1.0)
    envelope_NT = np.where(sounding_NT, np.sin(edge_NT * f32(np.pi / 2)) ** 2, f32(0.0))

    hiss_NT = np.stack([_scene_rng(s, _HISS).standard_normal(length, dtype=f32) for s in scenes])
    loudness_N1, hiss_N1 = (
        _field(scenes, f).astype(f32)[:, None] for f in ("loudness", "audio_noise")
    )
    wave_NT = loudness_N1 * envelope_NT * tone_NT + hiss_N1 * hiss_NT
    return np.clip(wave_NT, -1.0, 1.0)
