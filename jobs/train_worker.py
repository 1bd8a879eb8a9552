"""What each Ray Train worker runs: build or restore the model, stream mixed batches, step,
report metrics, checkpoint.

Every `report_every` steps all workers call `ray.train.report` (it is a barrier); at checkpoint
steps rank 0 attaches a checkpoint holding the whole model, EMA, optimizer, step, and every
rank's data position. After a worker failure Ray Train restarts the group and
`ray.train.get_checkpoint()` hands back the last one: the step counter, learning rate, EMA and
data streams continue from there. Rank 0 also writes each report to the run's `metrics.jsonl`
and TensorBoard events (`jobs.train_logs`), uploaded before each checkpoint when remote.
"""

import math
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from jobs.train_config import ModelSpec, TrainConfig
from jobs.train_logs import RunLogs
from omniflow import storage as st
from omniflow.ema import EMA
from omniflow.model_dir import (
    checkpoint_weights,
    fetch_model_dir,
    is_model_dir,
    is_training_checkpoint,
    load_model_dir,
    load_training_checkpoint,
    model_from_state_dict,
    save_training_checkpoint,
    transformer_config,
)
from omniflow.parallelize import (
    full_model_state,
    full_optimizer_state,
    full_tensor,
    load_full_state,
    parallelize,
    shard_like,
)
from omniflow.presets import build_transformer, model_cost
from omniflow.training import (
    Batch,
    GroupedBatches,
    build_optimizer,
    build_scheduler,
    train_step,
    validation_loss,
)
from omniflow.wrappers import unwrap
from pipelines.mixing import MixedBatches, Stream, presence, task_choice, to_batch

# Peak dense bf16 TFLOP/s per device, for MFU when the config gives none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def build_model(spec: ModelSpec, storage: st.StorageConfig, seed: int = 0) -> torch.nn.Module:
    """The transformer `spec` describes, on the CPU in float32 (a fresh one initialised from `seed`).
    An s3:// `init` is downloaded to a temporary directory first."""
    if spec.init is None:
        return build_transformer(spec.preset, seed=seed, **spec.overrides)
    if spec.init.startswith("sd3:"):
        from omniflow.convert.sd3 import transformer_from_sd3

        return transformer_from_sd3(spec.init.removeprefix("sd3:"), **spec.overrides)
    if st.scheme(spec.init) != "file":
        local = fetch_model_dir(spec.init, storage)
        return build_model(spec.model_copy(update={"init": str(local)}), storage)
    if is_training_checkpoint(spec.init):
        state = load_training_checkpoint(spec.init, optimizer=False)
        return model_from_state_dict(state["model_config"], checkpoint_weights(state, use_ema=spec.init_ema))
    if is_model_dir(spec.init):
        return load_model_dir(spec.init, dtype=torch.float32, device="cpu")
    raise FileNotFoundError(f"model.init {spec.init!r} is neither a model directory nor a training checkpoint")


def peak_flops(config: TrainConfig, device: torch.device) -> float | None:
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class Meter:
    """Sums over the steps between two reports."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.data_s, self.compute_s = 0, 0, 0.0, 0.0
        self.loss, self.modality, self.task = 0.0, defaultdict(list), defaultdict(list)
        self.grad_norms: list[float] = []
        self.start = time.perf_counter()

    def add(self, out, data_s: float, compute_s: float) -> None:
        self.steps += 1
        self.samples += out.samples
        self.data_s += data_s
        self.compute_s += compute_s
        self.loss += out.loss
        if out.grad_norm is not None:
            self.grad_norms.append(out.grad_norm)
        for k, v in out.per_modality.items():
            self.modality[k].append(v)
        for k, v in out.per_task.items():
            self.task[k].append(v)


def _validation_batches(config: TrainConfig, table: pa.Table | None, device: torch.device) -> list[Batch]:
    if table is None or table.num_rows == 0:
        return []
    spec = next(d for d in config.datasets if d.name == (config.validation.dataset or config.datasets[0].name))
    chosen = task_choice(presence(table, synthetic=spec.synthetic), spec.tasks, np.random.default_rng(config.validation.seed))
    table = table.filter(pa.array([t is not None for t in chosen], pa.bool_()))
    tasks = [t for t in chosen if t is not None]
    if not tasks:
        return []
    return [to_batch(table, tasks).to(device)]


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(config.seed)

    model = build_model(config.model, config.storage, config.seed)
    model_config = transformer_config(model)
    start_step, position = 0, None
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_training_checkpoint(directory)
        start_step = restored["step"]
        positions = restored["data_position"] or []
        position = positions[rank] if rank < len(positions) else None
        if rank == 0:
            _say(f"resuming from step {start_step}")

    model = parallelize(model, config.parallel, device=device,
                        mixed_precision=torch.bfloat16 if precision == "bf16" and config.parallel.strategy == "fsdp" else None,
                        streams_may_be_skipped=config.objective.rules.skip_absent)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=config.steps)
    ema = EMA.from_config(model, config.ema) if config.ema is not None else None
    if restored is not None:
        load_full_state(model, optimizer, restored["model"], restored["optimizer"])
        if ema is not None and restored["ema"] is not None:
            ema.load_state_dict({k: shard_like(v, ema.shadow[k]) for k, v in restored["ema"].items()})
        if restored["scheduler"] is not None:  # its step count; the schedule and peak are this run's
            scheduler.load_state_dict({k: v for k, v in restored["scheduler"].items() if k != "base_lrs"})
        else:  # a checkpoint from before the scheduler's state was kept
            scheduler.last_epoch = start_step
        # this run's schedule at the step it resumes from (a continued run may have more steps)
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
        del restored

    streams = []
    for name, meta in loop_config["streams"].items():
        shard = ray.train.get_dataset_shard(name)
        streams.append(Stream(
            name=name, weight=meta["weight"], tasks=meta["tasks"], synthetic=meta["synthetic"],
            open=lambda shard=shard: shard.iter_batches(
                batch_size=config.batch_size, batch_format="pyarrow", prefetch_batches=config.prefetch_batches
            ),
        ))
    mix = MixedBatches(streams, batch_size=config.batch_size, seed=config.seed, rank=rank, position=position,
                       cache_bytes=config.cache_mb_per_stream * 2**20)
    groups = GroupedBatches(config.batch_size) if config.grouped_batches else None
    val_batches = _validation_batches(config, loop_config.get("validation_rows"), device)

    shapes = {m: tuple(s) for m, s in loop_config["latent_shapes"].items() if m in unwrap(model).streams}
    flops_per_sample = model_cost(model_config, shapes).train_flops
    peak = peak_flops(config, device)
    logs = None
    if rank == 0:
        logs = RunLogs(metrics_log=loop_config["metrics_log"], tensorboard_dir=loop_config["tensorboard_dir"],
                       storage=config.storage, upload_every_s=config.log.upload_every_s)

    meter = Meter()
    model.train()
    try:
        for step in range(start_step + 1, config.steps + 1):
            t0 = time.perf_counter()
            micro = []
            for i in range(config.optim.grad_accum):
                index = step * config.optim.grad_accum + i
                if groups is None:
                    micro.append(to_batch(*mix.next_batch(index)).to(device))
                    continue
                # mixed batches drawn until one modality group fills a batch; what waits in
                # `groups` at a checkpoint is not in its data position (a resume skips it)
                draw = 0
                while (batch := groups.pop()) is None:
                    groups.push(to_batch(*mix.next_batch(index * 1000 + draw)))
                    draw += 1
                micro.append(batch.to(device))
            t1 = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(hash((config.seed, rank, step)) % 2**63)
            out = train_step(model, micro, optimizer=optimizer, scheduler=scheduler, objective=config.objective,
                             grad_clip=config.optim.grad_clip, precision=precision, generator=generator)
            if ema is not None:
                ema.update(model, step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            meter.add(out, t1 - t0, time.perf_counter() - t1)
            if not math.isfinite(out.loss):
                raise FloatingPointError(f"loss is {out.loss} at step {step}")

            last = step == config.steps
            save = last or step % config.checkpoint.every == 0
            validate = val_batches and (last or (step % config.validation.every == 0 if config.validation.every else save))
            if not (last or save or step % config.log.every == 0):
                continue
            metrics = _summary(meter, step, world, out.lr, flops_per_sample, peak)
            metrics["skipped_rows"] = mix.skipped_rows
            if validate:
                model.eval()
                metrics.update({f"val/{k}": v for k, v in validation_loss(
                    model, val_batches, objective=config.objective, times=config.validation.times,
                    seed=config.validation.seed, precision=precision).items()})
                if ema is not None:
                    with ema.swapped(model):
                        metrics["val/ema_loss"] = validation_loss(
                            model, val_batches, objective=config.objective, times=config.validation.times,
                            seed=config.validation.seed, precision=precision)["loss"]
                model.train()
            if rank == 0:
                _say(_line(metrics))
                logs.write(metrics, upload=save)  # before the checkpoint: a restart from it finds these lines
            if save:
                _report_with_checkpoint(metrics, model, optimizer, scheduler, ema, mix, step, model_config,
                                        loop_config, rank)
            else:
                ray.train.report(metrics)
            meter.reset()  # after validation and checkpointing: samples/s measures training steps only
    finally:  # what was logged reaches the run directory even when a step fails
        if logs is not None:
            logs.close()


def _summary(meter: Meter, step: int, world: int, lr: float, flops_per_sample: int, peak: float | None) -> dict:
    elapsed = max(time.perf_counter() - meter.start, 1e-9)
    samples_per_s = meter.samples * world / elapsed  # every worker steps in lockstep
    metrics = {
        "step": step,
        "loss": meter.loss / meter.steps,
        "lr": lr,
        "samples_per_s": samples_per_s,
        "step_time_s": elapsed / meter.steps,
        "data_wait_s": meter.data_s / meter.steps,
        "compute_s": meter.compute_s / meter.steps,
        "data_wait_share": meter.data_s / elapsed,
        "tflops_per_s": flops_per_sample * samples_per_s / 1e12,
        "mfu": flops_per_sample * samples_per_s / (peak * world) if peak else None,
    }
    if meter.grad_norms:  # before clipping, averaged over the steps since the last report
        metrics["grad_norm"] = float(np.mean(meter.grad_norms))
    metrics.update({f"loss/{k}": float(np.mean(v)) for k, v in meter.modality.items()})
    metrics.update({f"task/{k}": float(np.mean(v)) for k, v in meter.task.items()})
    return metrics


def _say(line: str) -> None:
    # Ray Train routes print() to its logger and the console both; one copy is enough.
    sys.stdout.write(f"[train] {line}\n")
    sys.stdout.flush()


def _line(metrics: dict) -> str:
    parts = [f"step {metrics['step']}", f"loss {metrics['loss']:.4f}"]
    parts += [f"{k.removeprefix('loss/')} {v:.3f}" for k, v in metrics.items() if k.startswith("loss/")]
    parts += [f"{metrics['samples_per_s']:.1f} samples/s", f"data wait {100 * metrics['data_wait_share']:.1f}%"]
    if metrics.get("grad_norm") is not None:
        parts.append(f"grad norm {metrics['grad_norm']:.3f}")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if "val/loss" in metrics:
        parts.append(f"val {metrics['val/loss']:.4f}")
    return " | ".join(parts)


def _report_with_checkpoint(metrics, model, optimizer, scheduler, ema, mix, step, model_config, loop_config,
                            rank) -> None:
    import ray.train

    # Collectives first, on every rank: whole states from shards, every rank's data position.
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    ema_state = {k: full_tensor(v) for k, v in ema.state_dict().items()} if ema is not None else None
    positions = [mix.position()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, mix.position())
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_training_checkpoint(
            directory, model_state=model_state, model_config=model_config, step=step, ema_state=ema_state,
            optimizer_state=optimizer_state, data_position=positions, config=loop_config["config"],
            model_info=loop_config["model_info"], scheduler_state=scheduler.state_dict(),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
