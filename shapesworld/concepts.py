"""ShapesWorld's vocabulary: concepts (colour x shape), their codes in each modality, and scenes.

A concept is what every modality of a triplet must agree on; a scene adds the nuisance that varies
freely (layout, lighting, wording, detune, loudness, timing). Renderers and checkers both import
the codebook from here, so the two can never drift apart.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Saturated colours on a neutral background, so the foreground is found by chroma and named by hue
# (which mixing with grey does not change); the closest hues (cyan, blue) are still far apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 40),
    "green": (40, 190, 60),
    "cyan": (40, 210, 210),
    "blue": (40, 70, 235),
    "magenta": (210, 50, 210),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Fundamentals evenly spaced on the (Slaney) mel scale, about 4.1 mel (~6 of 64 AudioLDM2 mel
# bins, 0-8 kHz) apart, so a mel round trip, a VAE and Griffin-Lim cannot move one onto the next.
# Ordered like light: red is the lowest.
PITCH_HZ: dict[str, float] = {
    "red": 300.0,
    "yellow": 570.0,
    "green": 850.0,
    "cyan": 1130.0,
    "blue": 1500.0,
    "magenta": 2000.0,
}


@dataclass(frozen=True)
class Rhythm:
    """How a shape sounds in time: `count` notes of `on_s` seconds, `off_s` of silence between."""

    count: int
    on_s: float
    off_s: float

    @property
    def duration_s(self) -> float:
        return self.count * self.on_s + (self.count - 1) * self.off_s


# Shape = number of notes (= corners; a circle has none and holds one note). Rhythm survives a
# lossy mel round trip far better than timbre: gaps of 90+ ms outlast the 64 ms STFT window.
RHYTHMS: dict[str, Rhythm] = {
    "circle": Rhythm(count=1, on_s=0.66, off_s=0.0),
    "triangle": Rhythm(count=3, on_s=0.16, off_s=0.10),
    "square": Rhythm(count=4, on_s=0.10, off_s=0.09),
}
# Timbre is a redundant cue (harmonic number -> amplitude; the fundamental always dominates, so a
# harmonic can never outweigh it in a pitch reading).
HARMONICS: dict[str, dict[int, float]] = {
    "circle": {1: 1.0},
    "square": {1: 1.0, 3: 1 / 3, 5: 1 / 5, 7: 1 / 7},
    "triangle": {1: 1.0, 2: 0.3, 3: 0.2, 4: 0.1},
}

# Layout, in fractions of the canvas side so any render size shares it. At 32 px: small shapes have
# a radius (half the bounding box) of 5.5-7.5 px, big ones 9-11 px, and every shape keeps a 1 px
# margin. A position is a third of the free range of the centre in each axis; only the outer fifths
# and the middle fifth are used, so the gaps between them make the words unambiguous to a reader.
SIZE_RADIUS: dict[str, tuple[float, float]] = {
    "small": (5.5 / 32, 7.5 / 32),
    "big": (9 / 32, 11 / 32),
}
SIZES: tuple[str, ...] = tuple(SIZE_RADIUS)
MARGIN = 1 / 32
AXIS_SPANS: dict[str, tuple[float, float]] = {
    "low": (0.0, 0.2),
    "mid": (0.4, 0.6),
    "high": (0.8, 1.0),
}
# (vertical, horizontal) -> position name; these names are also the caption's position words.
POSITION_AXES: dict[str, tuple[str, str]] = {
    "top left": ("low", "low"),
    "top": ("low", "mid"),
    "top right": ("low", "high"),
    "left": ("mid", "low"),
    "middle": ("mid", "mid"),
    "right": ("mid", "high"),
    "bottom left": ("high", "low"),
    "bottom": ("high", "mid"),
    "bottom right": ("high", "high"),
}
POSITIONS: tuple[str, ...] = tuple(POSITION_AXES)

# Text: templates with {size} {colour} {shape} {where} slots ({Where}: capitalised), and the words
# that fill them. A template that names a size or position always names the rendered one.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{colour} {shape}",
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "{Where}, a {colour} {shape}.",
    "A {colour} {shape} on a dark background.",
    "the {shape} is {colour}",
    "a {size} {colour} {shape} {where} of the picture",
)
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "big": ("big", "large"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left",),
    "top": ("at the top",),
    "top right": ("in the top right",),
    "left": ("on the left",),
    "middle": ("in the middle", "in the centre"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left",),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right",),
}


@dataclass(frozen=True, order=True)
class Concept:
    """The hidden content of a triplet, e.g. `Concept("red", "circle")`."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {list(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class ConceptSplit:
    """Concepts to train on and concepts held out to test composition (disjoint)."""

    train: tuple[Concept, ...]
    held_out: tuple[Concept, ...]


@dataclass(frozen=True)
class Scene:
    """A concept plus every nuisance value needed to render it in all three modalities.

    Geometry is in fractions of the canvas side; `seed` drives the per-sample noise and word
    choices, so rendering a scene is a pure function of the scene.
    """

    concept: Concept
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    radius: float  # half the side of the shape's bounding box
    centre_x: float
    centre_y: float
    background: float  # grey level in [0, 1]
    pixel_noise: float  # std of the Gaussian pixel noise, in [0, 1] units
    template: int  # caption template index
    detune_cents: float
    loudness: float  # peak amplitude of the tone
    onset_s: float
    tempo: float  # time stretch of the rhythm
    audio_noise: float  # std of the background hiss
    seed: int


def all_concepts() -> tuple[Concept, ...]:
    """Every (colour, shape) pair, colour-major: 6 x 3 = 18."""
    return tuple(Concept(c, s) for c in COLOURS for s in SHAPES)


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    """Independent random streams from one user seed, so that drawing more of one thing never
    shifts another. Streams in use: 0 concepts, 1 split, 2 scene nuisance, 3 planted defects."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), stream])


def sample_concepts(
    n: int,
    *,
    seed: int,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    pairs: Sequence[Concept] | None = None,
) -> list[Concept]:
    """`n` concepts drawn uniformly from the allowed pairs, deterministic for a seed.

    `colours` / `shapes` restrict the grid; `pairs` gives the allowed pairs directly (e.g. a
    `split_concepts(...).train`) and excludes the other two.

        >>> sample_concepts(2, seed=0, colours=["red"], shapes=["circle"])
        [Concept(colour='red', shape='circle'), Concept(colour='red', shape='circle')]
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if pairs is not None:
        if colours is not None or shapes is not None:
            raise ValueError("pass either pairs or colours/shapes, not both")
        allowed = [p if isinstance(p, Concept) else Concept(*p) for p in pairs]
    else:
        allowed = [Concept(c, s) for c in (colours or COLOURS) for s in (shapes or SHAPES)]
    if not allowed:
        raise ValueError("no concepts to sample from: colours, shapes or pairs is empty")
    picks = seeded_rng(seed, 0).integers(len(allowed), size=n)
    return [allowed[i] for i in picks]


def split_concepts(*, n_held_out: int = 3, seed: int = 0) -> ConceptSplit:
    """A deterministic train / held-out split of the concept grid for compositional evaluation.

    Held-out concepts have distinct colours and cycle through the shapes, so every colour and every
    shape still appears in training (with at least two partners) and only the combination is new.

        >>> split = split_concepts(n_held_out=3, seed=0)
        >>> len(split.train), len(split.held_out)
        (15, 3)
    """
    if not 1 <= n_held_out <= len(COLOURS):
        raise ValueError(f"n_held_out must be in [1, {len(COLOURS)}], got {n_held_out}")
    rng = seeded_rng(seed, 1)
    colour_order = rng.permutation(len(COLOURS))
    shape_offset = int(rng.integers(len(SHAPES)))
    held = {
        Concept(COLOURS[c], SHAPES[(i + shape_offset) % len(SHAPES)])
        for i, c in enumerate(colour_order[:n_held_out])
    }
    everything = all_concepts()
    return ConceptSplit(
        train=tuple(c for c in everything if c not in held),
        held_out=tuple(c for c in everything if c in held),
    )


def sample_scenes(concepts: Sequence[Concept], *, seed: int) -> list[Scene]:
    """One scene per concept with random nuisance, deterministic for a seed.

    Scene `i` depends only on (seed, i, concepts[i]), so a longer batch extends a shorter one and
    shards of one stream can be drawn independently.

        >>> scenes = sample_scenes(sample_concepts(4, seed=0), seed=0)
        >>> scenes[0].size in SIZES and scenes[0].position in POSITIONS
        True
    """
    seeded_rng(seed, 2)  # validates the seed
    return [
        _sample_scene(
            c if isinstance(c, Concept) else Concept(*c), np.random.default_rng([seed, 2, i])
        )
        for i, c in enumerate(concepts)
    ]


def _sample_scene(concept: Concept, rng: np.random.Generator) -> Scene:
    size = SIZES[rng.integers(len(SIZES))]
    lo, hi = SIZE_RADIUS[size]
    radius = float(rng.uniform(lo, hi))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    v_axis, h_axis = POSITION_AXES[position]
    return Scene(
        concept=concept,
        size=size,
        position=position,
        radius=radius,
        centre_x=_centre(radius, AXIS_SPANS[h_axis], rng.random()),
        centre_y=_centre(radius, AXIS_SPANS[v_axis], rng.random()),
        background=float(rng.uniform(0.04, 0.22)),
        pixel_noise=float(rng.uniform(0.0, 0.03)),
        template=int(rng.integers(len(CAPTION_TEMPLATES))),
        detune_cents=float(rng.uniform(-30.0, 30.0)),
        loudness=float(rng.uniform(0.3, 0.8)),
        onset_s=float(rng.uniform(0.02, 0.18)),
        tempo=float(rng.uniform(0.95, 1.05)),
        audio_noise=float(rng.uniform(0.0005, 0.005)),
        seed=int(rng.integers(2**62)),
    )


def _centre(radius: float, span: tuple[float, float], u: float) -> float:
    """A centre coordinate in `span` (fractions of the free range) that keeps the shape inside."""
    free = 1.0 - 2 * (radius + MARGIN)
    lo, hi = span
    return float(radius + MARGIN + free * (lo + (hi - lo) * u))
