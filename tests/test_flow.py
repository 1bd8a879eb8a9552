"""Closed-form checks of the rectified-flow maths."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from omniflow import flow


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)


def test_interpolation_endpoints(pair):
    x0, noise = pair
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(3)), noise)
    half = flow.interpolate(x0, noise, torch.full((3,), 0.5))
    torch.testing.assert_close(half, (x0 + noise) / 2)


def test_interpolation_is_per_sample(pair):
    x0, noise = pair
    t = torch.tensor([0.0, 1.0, 0.25])
    x_t = flow.interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])


def test_velocity_is_time_derivative(pair):
    x0, noise = pair
    t, dt = torch.full((3,), 0.3), 1e-3
    finite_difference = (flow.interpolate(x0, noise, t + dt) - flow.interpolate(x0, noise, t)) / dt
    torch.testing.assert_close(finite_difference, flow.velocity_target(x0, noise), atol=1e-3, rtol=1e-3)


def test_x0_velocity_round_trip(pair):
    x0, noise = pair
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.interpolate(x0, noise, t)
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, x0, t), v, atol=1e-5, rtol=1e-5)


def test_euler_step_with_exact_velocity_lands_on_x0(pair):
    x0, noise = pair
    t = torch.tensor(0.7)
    x_t = flow.interpolate(x0, noise, t.expand(3))
    out = flow.euler_step(x_t, flow.velocity_target(x0, noise), t, torch.tensor(0.0))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=1e-6)


def test_shift_closed_forms():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(flow.shift_timesteps(t, 1.0), t)
    shifted = flow.shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    torch.testing.assert_close(shifted[5], torch.tensor(0.75))  # 3*0.5 / (1 + 2*0.5)
    assert torch.all(shifted[1:-1] > t[1:-1]), "shift > 1 moves time towards noise"
    with pytest.raises(ValueError, match="shift"):
        flow.shift_timesteps(t, 0.0)


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_sample_timesteps_range_and_determinism(scheme):
    a = flow.sample_timesteps(10_000, scheme=scheme, generator=torch.Generator().manual_seed(1))
    b = flow.sample_timesteps(10_000, scheme=scheme, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert abs(a.mean().item() - 0.5) < 0.02  # all three densities are symmetric about 1/2


def test_logit_normal_mean_moves_the_mass():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(20_000, mean=1.0, generator=g)
    # median of sigmoid(N(1, 1)) is sigmoid(1)
    torch.testing.assert_close(t.median(), torch.sigmoid(torch.tensor(1.0)), atol=0.01, rtol=0)


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="scheme"):
        flow.sample_timesteps(2, scheme="cosine")


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (10, 1.0), (28, 3.0), (50, 3.0), (7, 2.5)])
def test_sigma_schedule_equals_diffusers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = flow.sigma_schedule(steps, shift=shift)
    assert ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=1e-7, rtol=0)
