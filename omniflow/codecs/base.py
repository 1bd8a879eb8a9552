"""The codec interface: media <-> latents for one modality, and a registry of implementations.

A codec turns a batch of media into the latents the transformer works on (normalised as it
expects, batch-first) and back. Each implementation has a pydantic config whose `kind` names it in
the registry and whose `path` names a local directory or a hub id; loading respects
`HF_HUB_OFFLINE` and a missing checkpoint fails with an error that names it.
"""

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from omniflow.modality import Modality

DType = Literal["float32", "float16", "bfloat16"]
CODEC_SET = "codecs.json"  # the index of a codec set directory


class CodecConfig(BaseModel):
    """Fields every codec config has; implementations subclass it with their own."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    path: str
    subfolder: str | None = None
    dtype: DType = "float32"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def weight_dirs(self) -> dict[str, list[str]]:
        """Where loading reads weights: config field holding a directory -> the subdirectories or
        files of it that are read ("." for all of it). A model directory copies exactly these."""
        return {"path": [self.subfolder or "."]}


class Codec(ABC):
    """Media <-> latents for one modality."""

    modality: ClassVar[Modality]
    config_class: ClassVar[type[CodecConfig]]

    def __init__(self, config: CodecConfig):
        self.config = config

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape (no batch dim)."""

    @abstractmethod
    def encode(self, media: Any) -> torch.Tensor:
        """A batch of media -> latents (B, *latent_shape)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> Any:
        """Latents (B, *latent_shape) -> a batch of media."""

    def null_latents(self) -> torch.Tensor:
        """(1, *latent_shape): the latent of this modality's null input (the empty caption, a zero
        image or log-mel), the posterior's mean, as the released pipeline's unconditional branch
        feeds it (`omniflow.conventions`)."""
        raise NotImplementedError(f"codec {self.config.kind!r} defines no null input")

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.config.torch_dtype


# Codecs and the pooled-vector encoders (which encode only) share one registry: anything with a
# `config_class` whose constructor takes that config.
_REGISTRY: dict[str, type] = {}
# Built-in kinds register when their module is imported; `build_codec` imports it on first use.
_BUILTIN: dict[str, str] = {
    "image-vae": "omniflow.codecs.image",
    "audioldm2": "omniflow.codecs.audio",
    "mel-vae": "omniflow.codecs.audio",
    "omniflow-text-vae": "omniflow.codecs.text_vae",
    "clip-text-pooled": "omniflow.codecs.pooled",
    "clip-image-pooled": "omniflow.codecs.pooled",
    "clap-audio-pooled": "omniflow.codecs.pooled",
    "open-clip-image-pooled": "omniflow.codecs.pooled",
    "open-clip-text-pooled": "omniflow.codecs.pooled",
    "mel-vit-audio-pooled": "omniflow.codecs.pooled",
    "languagebind-audio-pooled": "omniflow.codecs.languagebind",
}


def register_codec(kind: str) -> Callable[[type], type]:
    """Class decorator: make a codec buildable from a config whose `kind` is `kind`."""

    def add(cls: type) -> type:
        if kind in _REGISTRY:
            raise ValueError(f"codec kind {kind!r} is already registered by {_REGISTRY[kind].__name__}")
        _REGISTRY[kind] = cls
        return cls

    return add


def codec_kinds(modality: Modality | None = None, *, pooled: bool | None = None) -> list[str]:
    """Every registered kind; with `modality` only its codecs (`pooled=False`) or pooled encoders
    (`pooled=True`), which imports every kind's module to ask."""
    kinds = sorted(set(_REGISTRY) | set(_BUILTIN))
    if modality is None:
        return kinds
    return [k for k in kinds if _role(codec_class(k)) == (modality, bool(pooled))]


def _role(cls: type) -> tuple[Modality, bool]:
    """(modality, whether it is a pooled encoder) of a registered class."""
    from omniflow.codecs.pooled import PooledEncoder

    return cls.modality, issubclass(cls, PooledEncoder)


def codec_config_for(modality: Modality, config: CodecConfig | dict, *, pooled: bool = False) -> CodecConfig:
    """`codec_config`, with the kind required to be a codec (or with `pooled`, a pooled encoder)
    of `modality`; the error names the setting (`codecs.image.kind`) and the kinds that fit."""
    raw = config.model_dump() if isinstance(config, BaseModel) else dict(config)
    kind = raw.get("kind")
    try:
        cls = codec_class(kind)
    except ValueError:
        cls = None
    if cls is None or _role(cls) != (modality, pooled):
        what = "pooled" if pooled else "codecs"
        raise ValueError(f"{what}.{modality.value}.kind must be one of "
                         f"{codec_kinds(modality, pooled=pooled)}, got {kind!r}")
    return cls.config_class.model_validate(raw)


def codec_class(kind: Any) -> type:
    """The class registered for `kind` (its module is imported on first use)."""
    if kind not in _REGISTRY and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    if kind not in _REGISTRY:
        raise ValueError(f"codec kind {kind!r} is not registered; known kinds: {codec_kinds()}")
    return _REGISTRY[kind]


def codec_config(config: CodecConfig | dict) -> CodecConfig:
    """Validate a codec config (a dict from YAML, or a config object) without loading any weights:
    what preparing a codec's inputs needs (image resolution, mel settings)."""
    raw = config.model_dump() if isinstance(config, BaseModel) else dict(config)
    return codec_class(raw.get("kind")).config_class.model_validate(raw)


def build_codec(config: CodecConfig | dict) -> Any:
    """Validate a codec config (a dict from YAML, or a config object) and load the codec.

    Example:
        >>> codec = build_codec({"kind": "image-vae", "path": "stabilityai/stable-diffusion-3-medium-diffusers",
        ...                      "subfolder": "vae", "resolution": 512})
    """
    config = codec_config(config)
    return codec_class(config.kind)(config)


def load_pretrained(loader: Callable[..., Any], path: str, *, subfolder: str | None = None, **kwargs) -> Any:
    """`loader(path, subfolder=..., **kwargs)` (a `from_pretrained`) with an error naming the path.

    With `HF_HUB_OFFLINE=1` a hub id resolves only from the local cache; either way a checkpoint
    that cannot be found raises `FileNotFoundError` naming the path (and subfolder).
    """
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as err:
        where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise FileNotFoundError(
            f"cannot load a checkpoint from {where}: not a local model directory, and not a hub id "
            f"available offline. Cause: {err}"
        ) from err


def read_codec_set(root: str | Path) -> dict[str, dict[str, dict]]:
    """The codec configs a codec set directory lists: `root/codecs.json` holds
    `{"codecs": {modality: config}, "pooled": {modality: config}}` (either part may be absent)
    with each `path` relative to `root`; they come back with absolute paths, ready for
    `build_codec` or a job's `codecs` / `pooled` settings.

    Example:
        >>> read_codec_set("runs/toy/codecs")["codecs"]["image"]["kind"]
        'image-vae'
    """
    root = Path(root).resolve()
    index = root / CODEC_SET
    if not index.is_file():
        raise ValueError(f"{root} has no {CODEC_SET}: not a codec set directory")
    listed = json.loads(index.read_text())
    return {part: {m: {**c, "path": str(root / c["path"])} for m, c in listed.get(part, {}).items()}
            for part in ("codecs", "pooled")}
