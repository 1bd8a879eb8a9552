"""Encoded ShapesWorld records with planted, labelled defects, for testing curation end to end.

`make_records` gives rows as a raw source would hold them (PNG / WAV bytes and a caption) plus the
ground truth: the concept and which defect, if any, was planted. `detect_defect` is the reference
detector: it finds every planted defect from the bytes alone, using the media codecs and checkers.
"""

import io
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from omniflow.codecs.media import MediaError, decode_audio, decode_image, encode_audio, encode_image
from shapesworld.checkers import is_clipped, read_audio, read_caption, read_image
from shapesworld.concepts import (
    Concept,
    all_concepts,
    sample_concepts,
    sample_scenes,
    seeded_rng,
)
from shapesworld.render import (
    IMAGE_SIZE,
    SAMPLE_RATE,
    render_audio,
    render_backgrounds,
    render_captions,
    render_images,
)

# One defect per modality failure a curation job must catch. The concept columns always hold the
# truth the clean modalities show; a mismatched caption describes another concept.
DEFECTS: tuple[str, ...] = (
    "mismatched_caption",  # caption of another concept (same wording and layout)
    "truncated_image",  # image bytes cut in half: header fine, pixel data missing
    "blank_image",  # background only, no shape
    "noise_image",  # uniform random pixels
    "garbage_image",  # random bytes, no image header
    "silent_audio",  # all-zero samples (a valid WAV)
    "clipped_audio",  # over-driven 10-30x and hard-clipped at full scale
    "garbage_audio",  # random bytes, no audio header
)
NOISY_IMAGE_STD = 0.2  # pixel std (in [0, 1]) above which an unreadable image is noise, not blank


def make_records(
    n: int,
    *,
    seed: int,
    defect_rate: float = 0.0,
    defects: Sequence[str] = DEFECTS,
    pairs: Sequence[Concept] | None = None,
    image_format: str = "PNG",
    image_size: int = IMAGE_SIZE,
    sample_rate: int = SAMPLE_RATE,
) -> list[dict[str, Any]]:
    """`n` encoded triplets, `round(n * defect_rate)` of them with one planted defect each.

    Each row: `id` (str), `image` (bytes, `image_format`), `caption` (str), `audio` (WAV bytes),
    `colour`, `shape`, `size`, `position` (str, the truth) and `defect` (None or a name from
    `DEFECTS`). Defective rows are chosen at random and cycle through `defects`, so every kind
    appears when there are enough; everything is deterministic for a seed. `pairs` restricts the
    concepts (e.g. a training split).

        >>> rows = make_records(10, seed=0, defect_rate=0.2)
        >>> sorted(rows[0])
        ['audio', 'caption', 'colour', 'defect', 'id', 'image', 'position', 'shape', 'size']
        >>> sum(r["defect"] is not None for r in rows)
        2
    """
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown or (defect_rate > 0 and not defects):
        raise ValueError(
            f"defects must be a non-empty subset of {list(DEFECTS)}, got {list(defects)}"
        )
    concepts = sample_concepts(n, seed=seed, pairs=pairs)
    scenes = sample_scenes(concepts, seed=seed)
    images = render_images(scenes, size=image_size)
    captions = render_captions(scenes)
    waves = render_audio(scenes, sample_rate=sample_rate)

    rng = seeded_rng(seed, 3)
    n_bad = round(n * defect_rate)
    planted: list[str | None] = [None] * n
    kinds = [defects[j % len(defects)] for j in range(n_bad)]
    for i, kind in zip(rng.choice(n, size=n_bad, replace=False), rng.permutation(kinds)):
        planted[i] = str(kind)

    rows = []
    for i, scene in enumerate(scenes):
        image, caption, wave = images[i], captions[i], waves[i]
        defect = planted[i]
        if defect == "mismatched_caption":
            others = [c for c in all_concepts() if c != scene.concept]
            other = others[rng.integers(len(others))]
            caption = render_captions([replace(scene, concept=other)])[0]
        elif defect == "blank_image":
            image = render_backgrounds([scene], size=image_size)[0]
        elif defect == "noise_image":
            image = rng.integers(0, 256, image.shape, dtype=np.uint8)
        elif defect == "silent_audio":
            wave = np.zeros_like(wave)
        elif defect == "clipped_audio":
            wave = np.clip(wave * rng.uniform(10, 30), -1.0, 1.0)
        image_bytes = encode_image(image, format=image_format)
        audio_bytes = encode_audio(wave, sample_rate, format="WAV")
        if defect == "truncated_image":
            image_bytes = image_bytes[: len(image_bytes) // 2]
        elif defect == "garbage_image":
            image_bytes = rng.bytes(len(image_bytes))
        elif defect == "garbage_audio":
            audio_bytes = rng.bytes(len(audio_bytes))
        rows.append({
            "id": f"shapesworld-{seed}-{i:06d}",
            "image": image_bytes,
            "caption": caption,
            "audio": audio_bytes,
            "colour": scene.concept.colour,
            "shape": scene.concept.shape,
            "size": scene.size,
            "position": scene.position,
            "defect": defect,
        })
    return rows


def detect_defect(record: dict[str, Any]) -> str | None:
    """The defect a record shows, from its bytes and caption alone (None if it looks clean).

    The reference for curation tests: it recognises every kind in `DEFECTS` (one per record) by
    decoding with `omniflow.codecs.media` and reading with the checkers. A caption is mismatched
    when the image and the audio agree on a concept and the caption names another.
    """
    try:
        image = np.asarray(decode_image(record["image"]))
    except MediaError:
        return "truncated_image" if _has_image_header(record["image"]) else "garbage_image"
    try:
        wave, sample_rate = decode_audio(record["audio"])
    except MediaError:
        return "silent_audio" if _has_audio_header(record["audio"]) else "garbage_audio"
    if is_clipped([wave])[0]:
        return "clipped_audio"
    seen = read_image(image[None]).concepts()[0]
    if seen is None:
        return "noise_image" if image.std() / 255 > NOISY_IMAGE_STD else "blank_image"
    heard = read_audio([wave], sample_rate).concepts()[0]
    said = read_caption([record["caption"]]).concepts()[0]
    if seen == heard and said != seen:
        return "mismatched_caption"
    return None


def _has_image_header(data: bytes) -> bool:
    """Whether PIL recognises the format (so a decode failure means damaged pixel data)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _has_audio_header(data: bytes) -> bool:
    """Whether libsndfile parses the header (so a decode failure means unusable samples)."""
    try:
        soundfile.info(io.BytesIO(data))
        return True
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return False
