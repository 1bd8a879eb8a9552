"""Text-to-image with diffusers: `StableDiffusion3Pipeline` (type "sd3") or `FluxPipeline` ("flux").

The pipeline loads once per actor from a local directory or a hub id (`HF_HUB_OFFLINE=1` resolves
ids from the local cache only); each call renders a batch of captions, each from its own seed.

    >>> config = SD3Settings(path="stabilityai/stable-diffusion-3-medium-diffusers",
    ...                             dtype="bfloat16", steps=28, height=512, width=512)
    >>> gen = TextToImage(config, device="cuda")
    >>> png = gen.generate(["a red circle on a grey background"], [1234])[0]
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from omniflow.codecs.media import encode_image
from pipelines.generators.base import DType, Failure, GeneratorSettings, Output, PromptedPipeline

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# Latent side x patch size of both families (VAE downsampling 8, patch 2).
SIDE_MULTIPLE = 16


class _DiffusersImageSettings(GeneratorSettings):
    path: str = Field(description="a diffusers pipeline directory or hub id")
    dtype: DType = "float32"
    steps: int = Field(28, ge=1)
    guidance_scale: float = Field(7.0, ge=0)
    height: int = Field(1024, ge=SIDE_MULTIPLE)
    width: int = Field(1024, ge=SIDE_MULTIPLE)
    max_sequence_length: int = Field(256, ge=1, le=512)

    @model_validator(mode="after")
    def _sides(self):
        for side in ("height", "width"):
            if getattr(self, side) % SIDE_MULTIPLE:
                raise ValueError(f"{side}={getattr(self, side)} must be a multiple of {SIDE_MULTIPLE}")
        return self


class SD3Settings(_DiffusersImageSettings):
    type: Literal["sd3"] = "sd3"
    negative_prompt: str | None = None


class FluxSettings(_DiffusersImageSettings):
    type: Literal["flux"] = "flux"
    guidance_scale: float = Field(3.5, ge=0)  # FLUX.1-dev's distilled guidance
    max_sequence_length: int = Field(512, ge=1, le=512)


class TextToImage(PromptedPipeline):
    """Captions -> PNG bytes with an SD3 or Flux pipeline."""

    def __init__(self, config: SD3Settings | FluxSettings, *, device: str = "cpu"):
        super().__init__("image", PIPELINES[config.type], config, device=device)

    def generate(self, inputs: Sequence, seeds: Sequence[int]) -> list[Output]:
        c = self.config
        outputs, rows, result = self.run_pipeline(
            inputs, seeds, height=c.height, width=c.width, max_sequence_length=c.max_sequence_length
        )
        for i, image_HWC in zip(rows, result.images if result is not None else []):
            if not np.isfinite(image_HWC).all():
                outputs[i] = Failure("generated image has NaN or infinite pixels")
            else:
                outputs[i] = encode_image(np.round(np.clip(image_HWC, 0, 1) * 255).astype(np.uint8))
        return outputs
