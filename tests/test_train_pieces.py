"""The training loop's pieces, each alone: the starting transformer, a run's state through a
checkpoint and back (`omniflow.train_state`), what a report holds (`omniflow.train_report`), and
the validation batches (`pipelines.train_data`; the step's batches run in tests/test_train_job.py)."""

import time

import pytest
import torch

from omniflow import train_state
from omniflow.ema import EMA
from omniflow.initialize import initial_transformer
from omniflow.model_dir import (
    load_training_checkpoint,
    save_model_dir,
    save_training_checkpoint,
    transformer_config,
)
from omniflow.train_report import Meter, log_line, peak_flops, summarize
from omniflow.training import OptimConfig, StepOutput, build_optimizer, build_scheduler


def _step(model, optimizer, scheduler, ema, step):
    loss = sum(p.float().pow(2).mean() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    ema.update(model, step)


def _run(model, steps: int, total: int):
    config = OptimConfig(lr=1e-2, warmup_steps=2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=total)
    ema = EMA(model, decay=0.5)
    for step in range(1, steps + 1):
        _step(model, optimizer, scheduler, ema, step)
    return optimizer, scheduler, ema


def test_state_through_a_checkpoint_continues_the_run_exactly(tmp_path):
    """Three steps, a checkpoint, two more steps after restoring into a fresh model: the same
    weights, EMA and learning rate as five steps straight."""
    straight = initial_transformer(None, preset="tiny", seed=0)
    optimizer, _, ema = _run(straight, 5, total=10)

    first = initial_transformer(None, preset="tiny", seed=0)
    state = train_state.gather(first, *_run(first, 3, total=10), position={"s": {"epoch": 0, "rows": 12}})
    assert state.data_positions == [{"s": {"epoch": 0, "rows": 12}}]  # one rank
    save_training_checkpoint(tmp_path / "ckpt", **state.checkpoint_fields(), model_config=transformer_config(first), step=3)

    resumed = initial_transformer(None, preset="tiny", seed=1)  # other weights: all must come from the checkpoint
    config = OptimConfig(lr=1e-2, warmup_steps=2)
    r_optimizer = build_optimizer(resumed, config)
    r_scheduler = build_scheduler(r_optimizer, config, total_steps=10)
    r_ema = EMA(resumed, decay=0.5)
    checkpoint = load_training_checkpoint(tmp_path / "ckpt")
    train_state.restore(checkpoint, resumed, r_optimizer, r_scheduler, r_ema)
    assert train_state.data_position(checkpoint, 0) == {"s": {"epoch": 0, "rows": 12}}
    assert train_state.data_position(checkpoint, 1) is None  # a rank the checkpoint did not have starts over
    for step in (4, 5):
        _step(resumed, r_optimizer, r_scheduler, r_ema, step)

    assert r_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for name, a in ema.state_dict().items():
        torch.testing.assert_close(a, r_ema.state_dict()[name], msg=name)


def test_restore_without_scheduler_state_takes_the_step(tmp_path):
    """A checkpoint written before the schedule's state was kept resumes its schedule at its step."""
    model = initial_transformer(None, preset="tiny", seed=0)
    optimizer, _, _ = _run(model, 3, total=10)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": None,
                  "scheduler": None, "step": 3, "data_position": None}
    fresh = initial_transformer(None, preset="tiny", seed=0)
    config = OptimConfig(lr=1e-2, warmup_steps=2)
    f_optimizer = build_optimizer(fresh, config)
    f_scheduler = build_scheduler(f_optimizer, config, total_steps=10)
    train_state.restore(checkpoint, fresh, f_optimizer, f_scheduler, None)
    assert f_scheduler.last_epoch == 3
    assert f_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_initial_transformer_from_each_kind_of_init(tmp_path):
    fresh = initial_transformer(None, preset="tiny", seed=3)
    save_model_dir(fresh, tmp_path / "model")
    loaded = initial_transformer(str(tmp_path / "model"))
    torch.testing.assert_close(loaded.state_dict(), fresh.state_dict())
    ema = {k: torch.zeros_like(v) for k, v in fresh.named_parameters()}
    save_training_checkpoint(tmp_path / "ckpt", model_state=fresh.state_dict(), model_config=transformer_config(fresh),
                             step=1, ema_state=ema)
    raw = initial_transformer(str(tmp_path / "ckpt"), use_ema=False)
    averaged = initial_transformer(str(tmp_path / "ckpt"))
    torch.testing.assert_close(raw.state_dict(), fresh.state_dict())
    assert all(not p.any() for p in averaged.parameters())
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a training checkpoint"):
        initial_transformer(str(tmp_path))


def _out(loss: float, grad_norm: float, samples: int = 4) -> StepOutput:
    return StepOutput(loss=loss, per_modality={"image": loss / 2}, per_task={"t2i": loss}, task_counts={"t2i": samples},
                      grad_norm=grad_norm, lr=1e-4, samples=samples)


def test_report_means_and_throughput():
    meter = Meter()
    meter.start = time.perf_counter() - 2.0  # two seconds since the last report
    meter.add(_out(1.0, 3.0), data_s=0.5, compute_s=0.5)
    meter.add(_out(3.0, 5.0), data_s=0.0, compute_s=1.0)
    metrics = summarize(meter, step=10, world=2, lr=1e-4, flops_per_sample=1e9, peak=1e12)
    assert metrics["loss"] == 2.0 and metrics["grad_norm"] == 4.0
    assert metrics["loss/image"] == 1.0 and metrics["task/t2i"] == 2.0
    assert metrics["samples_per_s"] == pytest.approx(8.0, rel=0.05)  # 8 samples x 2 workers / 2 s
    assert metrics["data_wait_share"] == pytest.approx(0.25, rel=0.05)
    assert metrics["mfu"] == pytest.approx(8.0 * 1e9 / 2e12, rel=0.05)
    line = log_line(metrics)
    assert line.startswith("step 10 | loss 2.0000 | image 1.000") and "grad norm 4.000" in line and "MFU" in line
    meter.reset()
    assert meter.steps == 0 and meter.grad_norms == []


def test_peak_flops_given_or_unknown():
    assert peak_flops(torch.device("cpu"), 100.0) == 100e12
    assert peak_flops(torch.device("cpu")) is None
