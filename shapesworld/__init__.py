"""ShapesWorld: a procedural any-to-any toy domain with exact, fast quality checkers.

A hidden concept (colour x shape) is rendered as a coloured shape on a grey canvas, an English
caption and a short tone (pitch = colour, rhythm and timbre = shape), with nuisance that varies
freely (layout, lighting, wording, detune, loudness, timing). Checkers read the concept back from
any modality, so a generated sample can be scored without a learned judge.

    >>> from shapesworld import (concept_accuracy, read_image, render_images,
    ...                                   sample_concepts, sample_scenes)
    >>> concepts = sample_concepts(100, seed=0)
    >>> images = render_images(sample_scenes(concepts, seed=0))
    >>> concept_accuracy(read_image(images), concepts)["both"]
    1.0
"""

from shapesworld.checkers import (
    CaptionParse,
    Layout,
    Reading,
    concept_accuracy,
    is_clipped,
    parse_caption,
    read_audio,
    read_caption,
    read_image,
    read_layout,
)
from shapesworld.concepts import (
    COLOURS,
    PALETTE,
    PITCH_HZ,
    POSITIONS,
    RHYTHMS,
    SHAPES,
    SIZES,
    Concept,
    ConceptSplit,
    Scene,
    all_concepts,
    sample_concepts,
    sample_scenes,
    split_concepts,
)
from shapesworld.defects import DEFECTS, detect_defect, make_records
from shapesworld.render import (
    IMAGE_SIZE,
    SAMPLE_RATE,
    render_audio,
    render_backgrounds,
    render_captions,
    render_images,
)

__all__ = [
    "COLOURS", "DEFECTS", "IMAGE_SIZE", "PALETTE", "PITCH_HZ", "POSITIONS", "RHYTHMS",
    "SAMPLE_RATE", "SHAPES", "SIZES", "CaptionParse", "Concept", "ConceptSplit", "Layout",
    "Reading", "Scene", "all_concepts", "concept_accuracy", "detect_defect", "is_clipped",
    "make_records", "parse_caption", "read_audio", "read_caption", "read_image", "read_layout",
    "render_audio", "render_backgrounds", "render_captions", "render_images", "sample_concepts",
    "sample_scenes", "split_concepts",
]
