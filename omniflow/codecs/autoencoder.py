"""Small `AutoencoderKL`s trained by this project: the toy image VAE and the toy mel VAE.

The same diffusers class as the SD3 and AudioLDM2 VAEs, at toy sizes, so the codecs load real and
toy checkpoints with the same code. Training is plain: L1 or MSE reconstruction plus a small KL to
N(0, I), AdamW, batches drawn with a seeded generator. Afterwards `fit_latent_stats` stores each
latent channel's mean and std in the VAE's config (diffusers' `latents_mean` / `latents_std`), so
the flow model sees every channel centred at unit variance.

`LatentNorm` is the one mapping between a VAE's posterior and the flow model's latents, read from
the VAE's config: per channel when `latents_mean` / `latents_std` are set, else SD3's
`(z - shift_factor) * scaling_factor`.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKL

from omniflow.lr import warmup_cosine


def new_autoencoder_kl(
    *,
    channels: int,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    sample_size: int = 32,
    seed: int = 0,
) -> AutoencoderKL:
    """A freshly initialised `AutoencoderKL` that downsamples by 2 ** (len(block_out_channels) - 1).

    The mid-block attention is off: at these sizes it costs more than it gives.

    Example:
        >>> vae = new_autoencoder_kl(channels=3)
        >>> vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape
        torch.Size([1, 4, 8, 8])
    """
    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        mid_block_add_attention=False,
        scaling_factor=1.0,
    )


@dataclass(frozen=True)
class AutoencoderTrainResult:
    """Per-step losses: total, reconstruction, and KL per latent element."""

    loss: list[float]
    reconstruction: list[float]
    kl: list[float]


def train_autoencoder_kl(
    vae: AutoencoderKL,
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    reconstruction_loss: Literal["l1", "mse"] = "l1",
    warmup_steps: int = 50,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> AutoencoderTrainResult:
    """Train `vae` in place on (N, C, H, W) inputs in the VAE's input range.

    Loss: reconstruction (L1 or MSE) + kl_weight * KL, the KL averaged over latent elements so
    that `kl_weight` does not depend on the latent size. The learning rate warms up linearly,
    then decays on a cosine to a tenth. MSE learns flat colours much faster than L1, whose
    gradient treats a small colour error like a large one. Batches are drawn with replacement and the
    posterior sampled from one generator seeded by `seed`, so a run is reproducible on a device.
    `progress(step, loss)` is called after every step. The VAE is left in eval mode.
    """
    if data.ndim != 4 or data.shape[1] != vae.config.in_channels:
        raise ValueError(f"data must be (N, {vae.config.in_channels}, H, W), got shape {tuple(data.shape)}")
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    device = next(vae.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total=steps, warmup=min(warmup_steps, steps))
    )
    data = data.to(device, torch.float32)
    history: dict[str, list[float]] = {"loss": [], "reconstruction": [], "kl": []}
    vae.train()
    for step in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=generator).to(device)]
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise
        error = vae.decode(latents).sample - batch
        reconstruction = error.abs().mean() if reconstruction_loss == "l1" else error.pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = reconstruction + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for name, value in (("loss", loss), ("reconstruction", reconstruction), ("kl", kl)):
            history[name].append(value.item())
        if progress is not None:
            progress(step, history["loss"][-1])
    vae.eval()
    return AutoencoderTrainResult(**history)


@dataclass(frozen=True)
class LatentNorm:
    """Posterior z <-> normalised latents, from an `AutoencoderKL` config.

    Per channel (diffusers' convention for `latents_mean` / `latents_std`):
        latents = (z - mean[c]) * scaling_factor / std[c]
    otherwise (SD3's):
        latents = (z - shift_factor) * scaling_factor
    """

    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # False: encoding leaves the shift (or mean) in, z * scaling_factor, as the released OmniFlow
    # encodes its image and audio conditions; decoding removes it all the same.
    shift_on_encode: bool = True

    @classmethod
    def from_config(cls, config: Mapping, *, shift_on_encode: bool = True) -> "LatentNorm":
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if (mean is None) != (std is None):
            raise ValueError("a VAE config sets latents_mean and latents_std together or neither")
        if mean is not None and not (len(mean) == len(std) == config["latent_channels"]):
            raise ValueError(f"latents_mean / latents_std need {config['latent_channels']} values (one per "
                             f"latent channel), got {len(mean)} and {len(std)}")
        return cls(scaling_factor=float(config.get("scaling_factor", 1.0)),
                   shift_factor=float(config.get("shift_factor") or 0.0),
                   mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
                   shift_on_encode=shift_on_encode)

    def _per_channel(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (like.ndim - 2)
        as_tensor = lambda v: torch.tensor(v, device=like.device, dtype=like.dtype).view(shape)
        return as_tensor(self.mean), as_tensor(self.std)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior samples or means (B, C, ...) -> the flow model's latents."""
        if self.mean is None:
            return (z - self.shift_factor * self.shift_on_encode) * self.scaling_factor
        mean, std = self._per_channel(z)
        return (z - mean * self.shift_on_encode) * self.scaling_factor / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The flow model's latents (B, C, ...) -> what the VAE's decoder takes."""
        if self.mean is None:
            return latents / self.scaling_factor + self.shift_factor
        mean, std = self._per_channel(latents)
        return latents * std / self.scaling_factor + mean


@torch.no_grad()
def posterior_means(vae: AutoencoderKL, data: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """The posterior means (N, C, h, w) of `data` (N, C_in, H, W), float32."""
    param = next(vae.parameters())
    return torch.cat([vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mean.float()
                      for chunk in data.split(batch_size)])


def fit_latent_stats(vae: AutoencoderKL, data: torch.Tensor, *, batch_size: int = 64) -> LatentNorm:
    """Store each latent channel's mean and std over `data` in the VAE's config and return the norm.

    Saved with `vae.save_pretrained` as `latents_mean` / `latents_std` (with `scaling_factor` 1 and
    no shift), so the codecs hand the flow model centred latents of unit variance per channel. A VAE
    trained with a small KL weight spreads its information unevenly over channels (the toy image
    VAE's channel stds span more than 10x); one global scale would leave the weak channels buried
    under the flow's noise from its first steps. Posterior means are measured, so the result is
    deterministic.
    """
    means = posterior_means(vae, data, batch_size=batch_size).transpose(0, 1).flatten(1)
    vae.register_to_config(latents_mean=tuple(means.mean(1).tolist()), latents_std=tuple(means.std(1).tolist()),
                           scaling_factor=1.0, shift_factor=None)
    return LatentNorm.from_config(vae.config)
