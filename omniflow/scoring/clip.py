"""CLIP image-text similarity with open_clip: load a model, preprocess, embed, compare.

A model is an open_clip architecture name plus its weights: a pretrained tag (resolved through
open_clip's download cache, so offline only when cached) or a local checkpoint file (`.safetensors`,
`.pt`, `.bin`). A custom architecture comes as an open_clip model config JSON (`embed_dim`,
`vision_cfg`, `text_cfg`) whose file stem is the model name; it is registered with
`open_clip.add_model_config` before the model is built, so a tiny model trained here and a
released ViT-L/14 load through the same `open_clip.create_model_and_transforms` call.

    >>> clip = load_clip(ClipConfig(model_name="ViT-L-14-quickgelu", pretrained="openai"))
    >>> pixels = torch.stack([clip.preprocess(image) for image in images])
    >>> clip.similarity(clip.embed_images(pixels), clip.embed_texts(captions))  # (B,) cosines
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.utils import to_2tuple
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

LOCAL_DIR = "local-dir:"
Precision = Literal["fp32", "fp16", "bf16"]


class ClipConfig(BaseModel):
    """Which open_clip model to load.

    `model_name`: a built-in open_clip architecture ("ViT-L-14-quickgelu"), the stem of
    `config_file`, or "local-dir:DIR" (a directory with `open_clip_config.json` and weights).
    `pretrained`: a pretrained tag of that architecture ("openai") or a local checkpoint file; None
    builds random weights (benchmarks only). The default is OpenAI's ViT-L/14, whose image
    embeddings the LAION aesthetic heads were trained on (OpenAI's weights use QuickGELU).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_name: str = "ViT-L-14-quickgelu"
    pretrained: str | None = "openai"
    config_file: str | None = None
    precision: Precision = "fp32"
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ClipConfig":
        if self.model_name.startswith("hf-hub:"):
            raise ValueError(
                f"model_name {self.model_name!r}: hf-hub models are not supported; download the "
                "checkpoint and give model_name + pretrained=<file> or local-dir:<dir>"
            )
        if self.config_file is not None and Path(self.config_file).stem != self.model_name:
            raise ValueError(
                f"config_file {self.config_file!r} registers the model name {Path(self.config_file).stem!r}, "
                f"but model_name is {self.model_name!r}; they must match"
            )
        if self.model_name.startswith(LOCAL_DIR) and self.pretrained is not None:
            raise ValueError(
                f"pretrained must be None with model_name {self.model_name!r} (the directory holds the weights)"
            )
        return self


def _register(config: ClipConfig) -> None:
    if config.config_file is None:
        return
    path = Path(config.config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config_file {config.config_file!r}: no such open_clip model config")
    if open_clip.get_model_config(config.model_name) != json.loads(path.read_text()):
        open_clip.add_model_config(path)


def _architecture(config: ClipConfig) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) that `config` names."""
    _register(config)
    if config.model_name.startswith(LOCAL_DIR):
        return _local_dir_config(config)["model_cfg"]
    arch = open_clip.get_model_config(config.model_name)
    if arch is None:
        raise ValueError(
            f"model_name {config.model_name!r} is not an open_clip architecture; give config_file for a "
            f"custom one. Built-in: {open_clip.list_models()}"
        )
    return arch


def _local_dir_config(config: ClipConfig) -> dict:
    path = Path(config.model_name.removeprefix(LOCAL_DIR)) / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model_name {config.model_name!r}: {path} does not exist")
    return json.loads(path.read_text())


def preprocess_config(config: ClipConfig) -> dict:
    """The image preprocessing open_clip attaches to this model (size, mean, std, resize), without
    building the model: the CPU preprocessing stage needs the transform, not the weights."""
    cfg = asdict(PreprocessCfg())
    if config.model_name.startswith(LOCAL_DIR):
        cfg = merge_preprocess_dict(cfg, _local_dir_config(config).get("preprocess_cfg", {}))
    elif config.pretrained is not None:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(config.model_name, config.pretrained))
    cfg["size"] = to_2tuple(_architecture(config)["vision_cfg"].get("image_size", cfg["size"]))
    return cfg


def clip_transform(config: ClipConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, S, S) float tensor, exactly as the loaded model's `preprocess`."""
    return image_transform_v2(PreprocessCfg(**preprocess_config(config)), is_train=False)


@dataclass
class OpenClip:
    """A loaded open_clip model with its image preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device

    @property
    def image_size(self) -> int:
        return to_2tuple(self.model.visual.preprocess_cfg["size"])[0]

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]

    def embed_images(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> (B, D) float32 unit vectors."""
        pixels_BCHW = pixels_BCHW.to(self.device, self._param_dtype, non_blocking=True)
        return self.model.encode_image(pixels_BCHW, normalize=True).float()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, D) float32 unit vectors (tokens past the context length are cut)."""
        tokens = self.tokenizer(list(texts)).to(self.device, non_blocking=True)
        return self.model.encode_text(tokens, normalize=True).float()

    @staticmethod
    def similarity(images_BD: torch.Tensor, texts_BD: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine similarity of paired unit embeddings: (B,)."""
        return (images_BD * texts_BD).sum(dim=-1)

    @property
    def _param_dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype


def load_clip(config: ClipConfig | dict, *, device: str | torch.device = "cpu") -> OpenClip:
    """Build the open_clip model that `config` names and load its weights, in eval mode.

    A pretrained tag that is not in open_clip's cache (and cannot be downloaded) and a missing
    checkpoint file raise `FileNotFoundError` naming them.

    Example:
        >>> clip = load_clip({"model_name": "shapesworld-clip", "config_file": "runs/toy/clip/shapesworld-clip.json",
        ...                   "pretrained": "runs/toy/clip/open_clip_model.safetensors"})
        >>> clip.embed_texts(["a red circle"]).shape
        torch.Size([1, 64])
    """
    config = ClipConfig.model_validate(config) if isinstance(config, dict) else config
    _architecture(config)  # registers config_file, fails early on an unknown name
    pretrained = config.pretrained
    is_tag = pretrained is not None and open_clip.get_pretrained_cfg(config.model_name, pretrained) != {}
    if pretrained is not None and not is_tag and not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"pretrained {pretrained!r} is neither a checkpoint file nor a tag of {config.model_name!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(config.model_name)})"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.model_name, pretrained=pretrained, precision=config.precision, device=device,
            cache_dir=config.cache_dir,
        )
    except RuntimeError as err:
        if "download" not in str(err).lower():
            raise
        raise FileNotFoundError(
            f"cannot load open_clip weights {config.model_name!r} / {pretrained!r}: not in the local cache "
            f"and not downloadable here. Give a local checkpoint file as pretrained. Cause: {err}"
        ) from err
    assert model.visual.preprocess_cfg == preprocess_config(config), "preprocess drifted from open_clip's"
    tokenizer = open_clip.get_tokenizer(config.model_name, cache_dir=config.cache_dir)
    return OpenClip(model=model.eval().requires_grad_(False), preprocess=preprocess, tokenizer=tokenizer,
                    device=torch.device(device))
