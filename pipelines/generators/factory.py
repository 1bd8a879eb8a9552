"""Generator settings by `type`, and the factory that loads a generator from them.

The built-in types, then those installed packages provide (`pipelines.plugins`). Light to import
(no model library until a model generator is built), so that an actor running a light generator
starts fast.

    >>> gen = build_generator("caption", {"type": "image-to-text", "path": "Salesforce/blip-image-captioning-large"})
    >>> gen.modality
    'caption'
"""

from typing import Annotated, Union

from pydantic import BaseModel, Field, TypeAdapter

from pipelines import plugins
from pipelines.generators.base import Generator, ModalityName
from pipelines.generators.captioning import CaptionerSettings, ImageCaptioner
from pipelines.generators.text_to_audio import AudioLDM2Settings, TextToAudio
from pipelines.generators.text_to_image import FluxSettings, SD3Settings, TextToImage
from pipelines.resources import resolve_device

BUILTIN = (SD3Settings, FluxSettings, AudioLDM2Settings, CaptionerSettings)
PLUGINS = plugins.load(plugins.GENERATORS)
Settings = Annotated[Union[*BUILTIN, *PLUGINS], Field(discriminator="type")]
_SETTINGS = TypeAdapter(Settings)


def _type(settings: type[BaseModel]) -> str:
    return settings.model_fields["type"].default


# The generator types that can fill each modality.
TYPES: dict[str, tuple[str, ...]] = {
    "image": ("sd3", "flux"),
    "audio": ("audioldm2",),
    "caption": ("image-to-text",),
}
for _plugin in PLUGINS:
    for _modality in _plugin.fills:
        TYPES[_modality] += (_type(_plugin),)


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
    device = str(resolve_device(device))
    if isinstance(settings, PLUGINS):
        return settings.build(modality, device=device)
    if settings.type in ("sd3", "flux"):
        return TextToImage(settings, device=device)
    if settings.type == "audioldm2":
        return TextToAudio(settings, device=device)
    return ImageCaptioner(settings, device=device)
