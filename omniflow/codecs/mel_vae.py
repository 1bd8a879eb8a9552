"""Tiny mel VAEs for the toy domain: AudioLDM2's VAE class (diffusers `AutoencoderKL`) at toy sizes.

The network sees what AudioLDM2's VAE sees, log-mels (B, 1, T, n_mels) straight from `mel.log_mel`
(no extra normalisation), so the audio codec serves a toy VAE and the real one with the same code.
Building, training and scaling are `codecs.autoencoder`'s; this module fixes the mel layout.
"""

from typing import Any

import torch
from diffusers import AutoencoderKL

from omniflow.codecs.autoencoder import (
    AutoencoderTrainResult,
    fit_latent_stats,
    new_autoencoder_kl,
    train_autoencoder_kl,
)

__all__ = ["fit_latent_stats", "new_mel_vae", "train_mel_vae"]


def new_mel_vae(
    *,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    num_frames: int = 128,
    seed: int = 0,
) -> AutoencoderKL:
    """A new mono-mel `AutoencoderKL`, downsampling by 2 ** (len(block_out_channels) - 1).

    With the defaults a (B, 1, 128, 64) log-mel (`mel.TOY_MEL`) gives (B, 4, 32, 16) latents:
    AudioLDM2's VAE layout (3 blocks, factor 4) at a fraction of its width.

    Example:
        >>> vae = new_mel_vae()
        >>> vae.encode(torch.zeros(1, 1, 128, 64)).latent_dist.mean.shape
        torch.Size([1, 4, 32, 16])
    """
    return new_autoencoder_kl(
        channels=1,
        latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=num_frames,
        seed=seed,
    )


def train_mel_vae(vae: AutoencoderKL, mels: torch.Tensor, **options: Any) -> AutoencoderTrainResult:
    """Train `vae` in place on log-mels (N, 1, T, n_mels): L1 reconstruction + kl_weight * KL, with
    the options of `autoencoder.train_autoencoder_kl` (steps, batch_size, lr, kl_weight, seed,
    progress). Afterwards call `fit_latent_stats(vae, mels)` so the codec's latents have unit
    variance per channel, then `vae.save_pretrained(model_dir / "vae")`.

    Example:
        >>> mels = log_mel(waves_BN, TOY_MEL)                     # (N, 1, 128, 64)
        >>> result = train_mel_vae(new_mel_vae(), mels, steps=2000, batch_size=16, lr=1e-3, seed=0)
    """
    if mels.ndim != 4 or mels.shape[1] != 1:
        raise ValueError(f"mels must be (N, 1, T, n_mels), got shape {tuple(mels.shape)}")
    return train_autoencoder_kl(vae, mels, **options)
