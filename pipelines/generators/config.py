"""The job-side generator configs: each generator's settings plus its Ray Data stage's resources,
one union per modality (by `type`).

    >>> generators = GeneratorsConfig.model_validate(
    ...     {"image": {"type": "sd3", "path": "stabilityai/stable-diffusion-3-medium-diffusers",
    ...                "resources": {"num_gpus": 1, "batch_size": 8}},
    ...      "caption": {"type": "image-to-text", "path": "Salesforce/blip-image-captioning-large"}})
    >>> generators.image.resources.num_gpus, generators.audio
    (1.0, None)

A generator type that an installed package provides (`pipelines.plugins`) joins the union of each
modality it `fills`, with a stage's resources added to its settings.
"""

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field

from pipelines.generators.captioning import CaptionerSettings
from pipelines.generators.factory import PLUGINS
from pipelines.generators.text_to_audio import AudioLDM2Settings
from pipelines.generators.text_to_image import FluxSettings, SD3Settings
from pipelines.resources import StageResources


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resources: StageResources = Field(default_factory=StageResources)


class SD3GeneratorConfig(SD3Settings, _Stage):
    """Text-to-image with a diffusers `StableDiffusion3Pipeline`."""


class FluxGeneratorConfig(FluxSettings, _Stage):
    """Text-to-image with a diffusers `FluxPipeline`."""


class AudioLDM2GeneratorConfig(AudioLDM2Settings, _Stage):
    """Text-to-audio with a diffusers `AudioLDM2Pipeline`."""


class CaptionerConfig(CaptionerSettings, _Stage):
    """Captioning with a transformers image-to-text model (BLIP, BLIP-2, GIT...)."""


# Each plugin's settings with a stage's resources, as `<Name>Config`.
_PLUGIN_CONFIGS = tuple(type(p.__name__.removesuffix("Settings") + "Config", (p, _Stage), {}) for p in PLUGINS)


def _fill(modality: str, *builtin: type[BaseModel]) -> object:
    """The union of the configs that can fill `modality`, by `type`."""
    choices = (*builtin, *(c for c in _PLUGIN_CONFIGS if modality in c.fills))
    if len(choices) == 1:
        return choices[0]
    return Annotated[Union[choices], Field(discriminator="type")]  # noqa: UP007


ImageGeneratorConfig = _fill("image", SD3GeneratorConfig, FluxGeneratorConfig)
AudioGeneratorConfig = _fill("audio", AudioLDM2GeneratorConfig)
CaptionGeneratorConfig = _fill("caption", CaptionerConfig)


class GeneratorsConfig(BaseModel):
    """One generator per modality to fill; a modality without one cannot be filled."""

    model_config = ConfigDict(extra="forbid")
    image: ImageGeneratorConfig | None = None
    audio: AudioGeneratorConfig | None = None
    caption: CaptionGeneratorConfig | None = None
