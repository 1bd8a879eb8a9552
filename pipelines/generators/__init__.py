"""Generators that fill a curated row's missing modality, and their Ray Data stage.

Text-to-image (`sd3`, `flux`: diffusers), text-to-audio (`audioldm2`: diffusers), captioning
(`image-to-text`: transformers) and, for the ShapesWorld toy domain, the renderer (`shapesworld`)
standing in for all three. Every output records its provenance (generator, checkpoint, seed,
parameters); the same seed gives the same bytes. The job-side configs, with each stage's
resources, are in `pipelines.generators.config`.

    >>> from pipelines.generators import build_generator
    >>> captioner = build_generator("caption", {"type": "shapesworld"})
    >>> captioner.generate([png_bytes], seeds=[0])
    ['a small red circle in the top left']
"""

from pipelines.generators.base import MODALITIES, SOURCE_OF, Failure, Generator, GeneratorSettings, row_seed
from pipelines.generators.factory import TYPES, Settings, build_generator, parse_settings
from pipelines.generators.stage import ORDER, REJECT_REASON, SYNTHESIS_SAMPLE, GenerateStage, fill_batch, start_rows

__all__ = [
    "MODALITIES", "ORDER", "REJECT_REASON", "SOURCE_OF", "SYNTHESIS_SAMPLE", "TYPES", "Failure", "GenerateStage",
    "Generator", "GeneratorSettings", "Settings", "build_generator", "fill_batch", "parse_settings", "row_seed",
    "start_rows",
]
