"""The job-side generator configs: each generator's settings plus its Ray Data stage's resources,
one union per modality (by `type`).

    >>> generators = GeneratorsConfig.model_validate(
    ...     {"image": {"type": "sd3", "path": "stabilityai/stable-diffusion-3-medium-diffusers",
    ...                "resources": {"num_gpus": 1, "batch_size": 8}},
    ...      "audio": {"type": "shapesworld"}})
    >>> generators.image.resources.num_gpus, generators.caption
    (1.0, None)
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from pipelines.generators.captioning import CaptionerSettings
from pipelines.generators.shapesworld import ShapesWorldSettings
from pipelines.generators.text_to_audio import AudioLDM2Settings
from pipelines.generators.text_to_image import FluxSettings, SD3Settings
from pipelines.resources import StageResources


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resources: StageResources = Field(default_factory=StageResources)


class ShapesWorldGeneratorConfig(ShapesWorldSettings, _Stage):
    """The ShapesWorld renderer, standing in for a model on the toy domain."""


class SD3GeneratorConfig(SD3Settings, _Stage):
    """Text-to-image with a diffusers `StableDiffusion3Pipeline`."""


class FluxGeneratorConfig(FluxSettings, _Stage):
    """Text-to-image with a diffusers `FluxPipeline`."""


class AudioLDM2GeneratorConfig(AudioLDM2Settings, _Stage):
    """Text-to-audio with a diffusers `AudioLDM2Pipeline`."""


class CaptionerConfig(CaptionerSettings, _Stage):
    """Captioning with a transformers image-to-text model (BLIP, BLIP-2, GIT...)."""


ImageGeneratorConfig = Annotated[
    ShapesWorldGeneratorConfig | SD3GeneratorConfig | FluxGeneratorConfig, Field(discriminator="type")
]
AudioGeneratorConfig = Annotated[ShapesWorldGeneratorConfig | AudioLDM2GeneratorConfig, Field(discriminator="type")]
CaptionGeneratorConfig = Annotated[ShapesWorldGeneratorConfig | CaptionerConfig, Field(discriminator="type")]
AnyGeneratorConfig = (
    ShapesWorldGeneratorConfig | SD3GeneratorConfig | FluxGeneratorConfig | AudioLDM2GeneratorConfig | CaptionerConfig
)


class GeneratorsConfig(BaseModel):
    """One generator per modality to fill; a modality without one cannot be filled."""

    model_config = ConfigDict(extra="forbid")
    image: ImageGeneratorConfig | None = None
    audio: AudioGeneratorConfig | None = None
    caption: CaptionGeneratorConfig | None = None
