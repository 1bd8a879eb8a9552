"""The training loop's pieces, each alone: the starting transformer, a run's state through a
checkpoint and back (`omniflow.train_state`), what a report holds (`omniflow.train_report`), and
the validation batches (`pipelines.train_data`; the step's batches run in tests/test_train_job.py)."""

import time

import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omniflow import train_state
from omniflow.ema import EMA
from omniflow.initialize import initial_transformer
from omniflow.model_dir import (
    is_sharded_checkpoint,
    load_training_checkpoint,
    save_model_dir,
    save_training_checkpoint,
    transformer_config,
)
from omniflow.parallelize import ParallelConfig, full_model_state, parallelize
from omniflow.train_report import Meter, log_line, peak_flops, summarize
from omniflow.training import OptimConfig, StepOutput, build_optimizer, build_scheduler
from omniflow.wrappers import unwrap
from pipelines.train_data import deal_parts, rows_of_worker, shard_name


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


def _fresh(seed: int = 1):
    """A model (other weights than the run's: all must come from the checkpoint), its optimizer,
    schedule and EMA."""
    model = initial_transformer(None, preset="tiny", seed=seed)
    config = OptimConfig(lr=1e-2, warmup_steps=2)
    optimizer = build_optimizer(model, config)
    return model, optimizer, build_scheduler(optimizer, config, total_steps=10), EMA(model, decay=0.5)


def test_state_through_a_checkpoint_continues_the_run_exactly(tmp_path):
    """Three steps, a checkpoint, two more steps after restoring into a fresh model: the same
    weights, EMA and learning rate as five steps straight."""
    straight = initial_transformer(None, preset="tiny", seed=0)
    optimizer, _, ema = _run(straight, 5, total=10)

    first = initial_transformer(None, preset="tiny", seed=0)
    wrote = train_state.save(tmp_path / "ckpt", first, *_run(first, 3, total=10), position={"s": {"epoch": 0, "rows": 12}},
                             step=3, model_config=transformer_config(first))
    assert wrote and not is_sharded_checkpoint(tmp_path / "ckpt")

    resumed, r_optimizer, r_scheduler, r_ema = _fresh()
    step, position = train_state.restore(tmp_path / "ckpt", resumed, r_optimizer, r_scheduler, r_ema)
    assert (step, position) == (3, {"s": {"epoch": 0, "rows": 12}})
    for step in (4, 5):
        _step(resumed, r_optimizer, r_scheduler, r_ema, step)

    assert r_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict())
    torch.testing.assert_close(r_ema.state_dict(), ema.state_dict())


def test_restore_without_scheduler_state_takes_the_step(tmp_path):
    """A checkpoint written before the schedule's state was kept resumes its schedule at its step."""
    model = initial_transformer(None, preset="tiny", seed=0)
    optimizer, _, _ = _run(model, 3, total=10)
    save_training_checkpoint(tmp_path / "old", model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                             model_config=transformer_config(model), step=3)
    fresh, f_optimizer, f_scheduler, _ = _fresh()
    assert train_state.restore(tmp_path / "old", fresh, f_optimizer, f_scheduler, None) == (3, None)
    assert f_scheduler.last_epoch == 3
    assert f_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def _sharded_run(rank: int, world: int, root: str) -> None:
    """Two FSDP2 ranks: three steps, a sharded checkpoint (both ranks into one directory, as Ray
    Train merges its workers'), the weights gathered whole, then one more step and its weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    model = parallelize(initial_transformer(None, preset="tiny", seed=0), ParallelConfig(strategy="fsdp"),
                        device=torch.device("cpu"))
    optimizer, scheduler, ema = _run(model, 3, total=10)
    assert train_state.save(f"{root}/ckpt", model, optimizer, scheduler, ema, position={"rank": rank}, step=3,
                            model_config=transformer_config(unwrap(model)))
    whole = full_model_state(model)
    _step(model, optimizer, scheduler, ema, 4)
    after = full_model_state(model)
    if rank == 0:
        torch.save({"at_3": whole, "at_4": after}, f"{root}/reference.pt")
    dist.destroy_process_group()


def _resume_on_one_rank(rank: int, world: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg1", rank=rank, world_size=world)
    model = parallelize(initial_transformer(None, preset="tiny", seed=1), ParallelConfig(strategy="fsdp"),
                        device=torch.device("cpu"))
    config = OptimConfig(lr=1e-2, warmup_steps=2)
    optimizer = build_optimizer(model, config)
    scheduler, ema = build_scheduler(optimizer, config, total_steps=10), EMA(model, decay=0.5)
    step, position = train_state.restore(f"{root}/ckpt", model, optimizer, scheduler, ema)
    reference = torch.load(f"{root}/reference.pt")
    torch.testing.assert_close(full_model_state(model), reference["at_3"])
    _step(model, optimizer, scheduler, ema, 4)  # the optimizer's moments and the LR came back too
    torch.testing.assert_close(full_model_state(model), reference["at_4"])
    torch.save({"step": step, "position": position}, f"{root}/resumed.pt")
    dist.destroy_process_group()


def test_sharded_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    """FSDP2 on two ranks writes its checkpoint sharded (one file per rank, nothing gathered); it
    loads whole on one process without a process group, and resumes an FSDP2 run on one rank with
    the same weights, optimizer state and schedule."""
    root = str(tmp_path)
    mp.spawn(_sharded_run, args=(2, root), nprocs=2)
    assert is_sharded_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    reference = torch.load(tmp_path / "reference.pt")
    whole = load_training_checkpoint(tmp_path / "ckpt", optimizer=False)
    assert whole["step"] == 3 and whole["data_position"] == [{"rank": 0}, {"rank": 1}]
    torch.testing.assert_close(whole["model"], reference["at_3"])
    assert set(whole["ema"]) == {n for n, _ in initial_transformer(None, preset="tiny").named_parameters()}
    assert initial_transformer(str(tmp_path / "ckpt"), use_ema=False).state_dict().keys() == reference["at_3"].keys()

    mp.spawn(_resume_on_one_rank, args=(1, root), nprocs=1)
    assert torch.load(tmp_path / "resumed.pt") == {"step": 3, "position": {"rank": 0}}


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


def test_workers_get_disjoint_rows_that_cover_the_stream():
    """Each worker reads rows of its own: whole parts when there is one per worker, else every
    part filtered by key hash; together the workers read every row once."""
    assert deal_parts({"a": 5, "b": 3, "c": 2, "d": 1}, 2) == [["a", "d"], ["b", "c"]]
    assert deal_parts({"a": 5, "b": 3, "c": 2, "d": 1}, 1) == [["a", "b", "c", "d"]]
    assert deal_parts({"a": 5}, 2) is None  # fewer parts than workers: rows are split by key
    table = pa.table({"key": [f"k{i}" for i in range(1000)], "x": list(range(1000))})
    shards = [rows_of_worker(table, rank, 3) for rank in range(3)]
    keys = [set(s.column("key").to_pylist()) for s in shards]
    assert sum(map(len, keys)) == 1000 and set().union(*keys) == set(table.column("key").to_pylist())
    assert all(250 < len(k) < 420 for k in keys)  # about a third each
    assert shard_name("laion.shapes-image-text", 1) != shard_name("laion.shapes-image-text", 0)


STREAMS_OF_RANK = (["image", "text", "audio"], ["text", "audio"])


def _streams_loss(model, present: list[str]) -> torch.Tensor:
    """A loss over the `present` streams' outputs, on inputs fixed by the stream set."""
    config = unwrap(model).config
    generator = torch.Generator().manual_seed(len(present))
    shapes = {"text": (4, config.joint_attention_dim), "image": (config.in_channels, config.sample_size, config.sample_size),
              "audio": (config.audio_in_channels, *config.audio_sample_size)}
    latents = {m: torch.randn(2, *shapes[m], generator=generator) for m in present}
    out = model(latents, {m: torch.full((2,), 0.5) for m in present})
    return sum(o.pow(2).mean() for o in out.values())


def _optimizer(model):
    return build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=1))


def _ranks_with_other_streams(rank: int, world: int, root: str) -> None:
    """Two FSDP2 ranks whose batches hold other streams (all three on one, text and audio on the
    other), as grouped batches with skip_absent give them; one training step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    model = parallelize(initial_transformer(None, preset="tiny", seed=0), ParallelConfig(strategy="fsdp"),
                        device=torch.device("cpu"), streams_may_be_skipped=True)
    optimizer = _optimizer(model)
    _streams_loss(model, STREAMS_OF_RANK[rank]).backward()
    optimizer.step()
    whole = full_model_state(model)
    if rank == 0:
        torch.save(whole, f"{root}/after.pt")
    dist.destroy_process_group()


def test_fsdp_ranks_may_leave_out_different_streams(tmp_path):
    """FSDP2 reduces the gradients each rank has: without every parameter in each unit's graph,
    ranks that used other streams reduce different tensors together (or fail on their sizes).
    With it, the step equals one process's step on the mean of both ranks' losses."""
    mp.spawn(_ranks_with_other_streams, args=(2, str(tmp_path)), nprocs=2)
    torch.set_num_threads(1)
    model = initial_transformer(None, preset="tiny", seed=0)
    optimizer = _optimizer(model)
    (sum(_streams_loss(model, present) for present in STREAMS_OF_RANK) / 2).backward()
    optimizer.step()
    torch.testing.assert_close(torch.load(tmp_path / "after.pt"), model.state_dict(), rtol=1e-4, atol=1e-6)
