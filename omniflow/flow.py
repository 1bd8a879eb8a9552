"""Rectified-flow maths as pure functions.

Convention (SD3): flow time t in [0, 1], x_t = (1 - t) * x0 + t * noise, so t = 0 is data and
t = 1 is pure noise; the velocity is dx_t/dt = noise - x0. Every modality has its own t.
Randomness enters only through an explicit `torch.Generator`.
"""

import math
from typing import Literal

import torch

TimestepScheme = Literal["logit_normal", "uniform", "mode"]


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) matching `like`'s rank."""
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)).to(like.dtype)


def sample_timesteps(
    batch_size: int,
    *,
    scheme: TimestepScheme = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw t in (0, 1) for a batch: SD3's logit-normal, uniform, or "mode" density.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_timesteps(4, generator=g).shape
        torch.Size([4])
    """
    if scheme == "logit_normal":
        z = torch.randn(batch_size, generator=generator, device=device) * std + mean
        return torch.sigmoid(z)
    u = torch.rand(batch_size, generator=generator, device=device)
    if scheme == "uniform":
        return u
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"scheme must be 'logit_normal', 'uniform' or 'mode', got {scheme!r}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: t' = s t / (1 + (s - 1) t). shift=1 is the identity."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t of shape (B,)."""
    t = _broadcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity dx_t/dt = noise - x0 that a velocity head regresses."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v."""
    return x_t - _broadcast(t, x_t) * velocity


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x0) / t, for an x0 head (the text stream). Undefined at t = 0."""
    return (x_t - x0) / _broadcast(t, x_t)


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when denoising)."""
    return x_t + _broadcast(t_next - t, x_t) * velocity


def sigma_schedule(steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The `steps + 1` times an Euler sampler visits, from 1 down to a final 0.

    Equal to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`
    sigmas: evenly spaced between 1 and the shifted smallest training time, then shifted.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t_min = shift_timesteps(torch.tensor(1.0 / num_train_timesteps), shift).item()
    t = torch.linspace(1.0, t_min, steps, dtype=torch.float64)
    t = shift_timesteps(t, shift).to(torch.float32)
    return torch.cat([t, t.new_zeros(1)])
