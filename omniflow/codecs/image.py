"""Image codec: a diffusers `AutoencoderKL` (the SD3 VAE for real runs, a tiny one for ShapesWorld).

Latents are normalised as the VAE's own config says (`autoencoder.LatentNorm`): SD3's
(posterior - shift_factor) * scaling_factor (1.5305 and 0.0609 for its 16-channel VAE), or per
channel with `latents_mean` / `latents_std` (the toy VAE's). Pixels enter in [0, 1] at the
configured square resolution; `preprocess` resizes the short side and centre-crops.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from diffusers import AutoencoderKL
from PIL import Image
from pydantic import Field

from omniflow.codecs.autoencoder import LatentNorm
from omniflow.codecs.base import Codec, CodecConfig, load_pretrained, register_codec
from omniflow.codecs.media import decode_image
from omniflow.modality import Modality

Resize = Literal["bicubic", "pil-bilinear"]


class ImageVAEConfig(CodecConfig):
    """`path` is a VAE directory or hub id; SD3 pipelines keep it in `subfolder: vae`."""

    kind: str = "image-vae"
    resolution: int = Field(512, gt=0)
    sample_posterior: bool = False
    shift_on_encode: bool = Field(True, description="subtract the VAE's shift_factor (or latents_mean) when "
                                  "encoding; the released OmniFlow encodes conditions without it")
    resize: Resize = Field("bicubic", description="how the short side is resized: antialiased bicubic, or PIL's "
                           "bilinear on the 8-bit image, as the released OmniFlow's pipeline does")


def as_pil(image: Image.Image | bytes | np.ndarray) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes or an HxWx3 uint8 array."""
    if isinstance(image, bytes):
        return decode_image(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return image.convert("RGB")


def to_pixels(images: Sequence[Image.Image | bytes | np.ndarray], resolution: int, *,
              resize: "Resize" = "bicubic") -> torch.Tensor:
    """Images (PIL, encoded bytes or HxWx3 uint8) -> (B, 3, R, R) float in [0, 1].

    The short side is resized to R and the centre R x R is kept. `resize`: "bicubic" resizes the
    float image (antialiased bicubic); "pil-bilinear" resizes the 8-bit image with PIL's bilinear
    filter first, as the released OmniFlow's pipeline does.
    """
    out = []
    for image in images:
        image = as_pil(image)
        if resize == "pil-bilinear":
            pixels = TF.pil_to_tensor(TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR))
            pixels = pixels.float() / 255.0
        else:
            pixels = TF.pil_to_tensor(image).float() / 255.0
            pixels = TF.resize(pixels, resolution, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.center_crop(pixels, [resolution, resolution]).clamp(0, 1))
    return torch.stack(out)


@register_codec("image-vae")
class ImageVAECodec(Codec):
    """Images <-> normalised `AutoencoderKL` latents (B, C, R/f, R/f), f the VAE's downsampling.

    Example:
        >>> codec = build_codec({"kind": "image-vae", "path": "stabilityai/stable-diffusion-3-medium-diffusers",
        ...                      "subfolder": "vae", "resolution": 512})
        >>> latents = codec.encode(codec.preprocess([Image.open("cat.png")]))   # (1, 16, 64, 64)
    """

    modality = Modality.IMAGE
    config_class = ImageVAEConfig

    def __init__(self, config: ImageVAEConfig):
        super().__init__(config)
        self.vae: AutoencoderKL = load_pretrained(
            AutoencoderKL.from_pretrained, config.path, subfolder=config.subfolder, torch_dtype=self.dtype
        ).to(self.device).eval()
        self.vae.requires_grad_(False)
        self.norm = LatentNorm.from_config(self.vae.config, shift_on_encode=config.shift_on_encode)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if config.resolution % self.downsample:
            raise ValueError(f"resolution {config.resolution} is not a multiple of the VAE's factor {self.downsample}")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.config.resolution // self.downsample
        return (self.vae.config.latent_channels, side, side)

    def preprocess(self, images: Sequence[Image.Image | bytes | np.ndarray]) -> torch.Tensor:
        return to_pixels(images, self.config.resolution, resize=self.config.resize)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, R, R) in [0, 1] -> (B, C, R/f, R/f) normalised latents."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        posterior = self.vae.encode(pixels.to(self.device, self.dtype) * 2 - 1).latent_dist
        z = posterior.sample(generator) if self.config.sample_posterior else posterior.mode()
        return self.norm.normalise(z)

    @torch.no_grad()
    def null_latents(self) -> torch.Tensor:
        """The latent of an image that is zero in the VAE's input range [-1, 1] (mid grey)."""
        side = self.config.resolution
        zero = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
        return self.norm.normalise(self.vae.encode(zero).latent_dist.mode())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, h*f, w*f) pixels in [0, 1]."""
        z = self.norm.denormalise(latents.to(self.device, self.dtype))
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def to_uint8(pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 for PNG encoding."""
        return (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
