"""EMA: closed forms, the start step, swapping, state round trips, DDP and FSDP2 wrapping."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from omniflow.ema import EMA, EMAConfig
from omniflow.presets import build_transformer


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_update_matches_closed_form():
    """Parameters held at p1 after the shadow starts at p0: shadow_k = d^k p0 + (1 - d^k) p1."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema, decay = EMA(model, decay=0.9), 0.9
    _set(model, 2.0)
    for k in range(1, 5):
        ema.update(model, step=k)
        for name, s in ema.state_dict().items():
            expected = decay**k * p0[name] + (1 - decay**k) * 2.0
            torch.testing.assert_close(s, expected, rtol=0, atol=1e-6)


def test_start_step_copies_then_averages():
    model = nn.Linear(2, 2)
    ema = EMA.from_config(model, EMAConfig(decay=0.5, start_step=3))
    for step, value in ((1, 1.0), (2, 4.0)):  # before the start: the shadow follows the weights
        _set(model, value)
        ema.update(model, step)
        assert all(torch.equal(s, torch.full_like(s, value)) for s in ema.shadow.values())
    _set(model, 8.0)
    ema.update(model, 3)  # from the start step on: averaging
    assert all(torch.equal(s, torch.full_like(s, 6.0)) for s in ema.shadow.values())


def test_swapped_puts_ema_in_and_restores_raw_weights():
    torch.manual_seed(0)
    model = build_transformer("tiny")
    ema = EMA(model, decay=0.5)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set(model, 0.0)
    ema.update(model, 1)
    _set(model, 1.0)
    inside = {}
    with ema.swapped(model):
        inside = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(inside[n], 0.5 * raw[n]) for n in raw)
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.parameters())
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.parameters())


def test_shadow_is_float32_and_state_round_trips():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.99)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    other = EMA(model, decay=0.99)
    _set(model, 3.0)
    other.update(model, 1)
    ema.load_state_dict(other.state_dict())
    assert all(torch.equal(ema.shadow[n], other.shadow[n]) for n in ema.shadow)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="weight has shape"):
        ema.load_state_dict({"weight": torch.zeros(2, 4), "bias": torch.zeros(4)})


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_and_compile_wrappers_are_looked_through(process_group):
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    ddp = nn.parallel.DistributedDataParallel(bare)
    ema = EMA(ddp, decay=0.5)
    assert list(ema.state_dict()) == [n for n, _ in bare.named_parameters()]
    _set(bare, 1.0)
    ema.update(torch.compile(ddp), 1)  # compiled lazily: wrapping costs nothing until called
    bare.load_state_dict({n: s for n, s in ema.state_dict().items()})  # loads into the bare model


def test_fsdp2_sharded_parameters(process_group):
    """With FSDP2 (DTensor parameters) the average, the swap and the restore behave as on a bare model."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    sharded = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    sharded.load_state_dict(reference.state_dict())
    fully_shard(sharded[0])
    fully_shard(sharded)
    ema_ref, ema_sharded = EMA(reference, decay=0.75), EMA(sharded, decay=0.75)
    for model in (reference, sharded):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-2.0)
    ema_ref.update(reference, 1)
    ema_sharded.update(sharded, 1)
    x = torch.randn(5, 4)
    with ema_ref.swapped(reference), ema_sharded.swapped(sharded):
        torch.testing.assert_close(sharded(x), reference(x))
    torch.testing.assert_close(sharded(x), reference(x))  # raw weights again, not stale gathered ones
    full = {n: s.full_tensor() for n, s in ema_sharded.state_dict().items()}
    torch.testing.assert_close(full, ema_ref.state_dict())


def test_ddp_in_a_group_of_one_is_left_out(process_group):
    """One worker has nothing to synchronise: `parallelize` returns the model itself for DDP."""
    from omniflow.parallelize import ParallelConfig, parallelize
    from omniflow.presets import build_transformer

    model = build_transformer("tiny", seed=0)
    assert parallelize(model, ParallelConfig(strategy="ddp"), device=torch.device("cpu")) is model
