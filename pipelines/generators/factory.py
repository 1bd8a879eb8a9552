"""Generator settings by `type`, and the factory that loads a generator from them.

Light to import (no model library until a model generator is built), so that an actor running the
ShapesWorld renderer starts fast.

    >>> gen = build_generator("audio", {"type": "shapesworld", "audio_format": "WAV"})
    >>> gen.name, gen.modality
    ('shapesworld-renderer', 'audio')
"""

from typing import Annotated

from pydantic import BaseModel, Field, TypeAdapter

from pipelines.generators.base import Generator, ModalityName
from pipelines.generators.captioning import CaptionerSettings, ImageCaptioner
from pipelines.generators.shapesworld import ShapesWorldGenerator, ShapesWorldSettings
from pipelines.generators.text_to_audio import AudioLDM2Settings, TextToAudio
from pipelines.generators.text_to_image import FluxSettings, SD3Settings, TextToImage
from pipelines.resources import resolve_device

Settings = Annotated[
    ShapesWorldSettings | SD3Settings | FluxSettings | AudioLDM2Settings | CaptionerSettings,
    Field(discriminator="type"),
]
_SETTINGS = TypeAdapter(Settings)
# The generator types that can fill each modality.
TYPES: dict[str, tuple[str, ...]] = {
    "image": ("shapesworld", "sd3", "flux"),
    "audio": ("shapesworld", "audioldm2"),
    "caption": ("shapesworld", "image-to-text"),
}


def parse_settings(settings: dict | BaseModel) -> Settings:
    """Generator settings from a dict or a config object (a job config's stage `resources`, which
    only the driver needs, are left out)."""
    if isinstance(settings, BaseModel):
        settings = settings.model_dump(mode="json")
    return _SETTINGS.validate_python({k: v for k, v in settings.items() if k != "resources"})


def build_generator(modality: ModalityName, settings: dict | BaseModel, *, device: str = "auto") -> Generator:
    """Load the generator that `settings` describe to fill `modality` (model weights load here).

    `device` is "cpu", "cuda" or "auto" (CUDA when this process sees a GPU).
    """
    settings = parse_settings(settings)
    if settings.type not in TYPES[modality]:
        raise ValueError(f"a {settings.type!r} generator cannot fill {modality}; use one of {list(TYPES[modality])}")
    if settings.type == "shapesworld":
        return ShapesWorldGenerator(modality, settings)
    device = str(resolve_device(device))
    if settings.type in ("sd3", "flux"):
        return TextToImage(settings, device=device)
    if settings.type == "audioldm2":
        return TextToAudio(settings, device=device)
    return ImageCaptioner(settings, device=device)
