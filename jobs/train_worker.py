"""What each Ray Train worker runs: build or restore the model, stream mixed batches, step,
report metrics, checkpoint.

Every `report_every` steps all workers call `ray.train.report` (it is a barrier); at checkpoint
steps they attach a checkpoint (`omniflow.train_state.save`): under FSDP2 each rank its shard of
the model, EMA and optimizer, otherwise rank 0 the whole of them; with the step and every rank's
data position. After a worker failure Ray Train restarts the group and
`ray.train.get_checkpoint()` hands back the last one: the step counter, learning rate, EMA and
data streams continue from there. Rank 0 also writes each report to the run's `metrics.jsonl`
and TensorBoard events (`jobs.train_logs`), uploaded before each checkpoint when remote.
"""

import math
import sys
import tempfile
import time
from typing import Any

import torch

from jobs.train_config import TrainConfig
from jobs.train_logs import RunLogs
from omniflow import train_state
from omniflow.codecs import build_codec
from omniflow.ema import EMA
from omniflow.initialize import initial_transformer
from omniflow.model_dir import (
    transformer_config,
)
from omniflow.parallelize import parallelize
from omniflow.presets import model_cost
from omniflow.train_report import Meter, log_line, peak_flops, summarize
from omniflow.training import (
    GroupedBatches,
    build_optimizer,
    build_scheduler,
    train_step,
    validation_loss,
)
from omniflow.wrappers import unwrap
from pipelines.mixing import MixedBatches, Stream
from pipelines.train_data import micro_batches, shard_name, validation_batches


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

    spec = config.model
    model = initial_transformer(spec.init, preset=spec.preset, overrides=spec.overrides, storage=config.storage,
                                seed=config.seed, use_ema=spec.init_ema)
    model_config = transformer_config(model)
    model = parallelize(model, config.parallel, device=device,
                        mixed_precision=torch.bfloat16 if precision == "bf16" and config.parallel.strategy == "fsdp" else None,
                        streams_may_be_skipped=config.objective.rules.skip_absent)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=config.steps)
    ema = EMA.from_config(model, config.ema) if config.ema is not None else None
    start_step, position = 0, None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            start_step, position = train_state.restore(directory, model, optimizer, scheduler, ema)
        if rank == 0:
            _say(f"resuming from step {start_step}")

    mix = MixedBatches(_streams(loop_config["streams"], config, rank), batch_size=config.batch_size, seed=config.seed,
                       rank=rank, position=position, cache_bytes=config.cache_mb_per_stream * 2**20)
    groups = GroupedBatches(config.batch_size) if config.grouped_batches else None
    val_spec = next(d for d in config.datasets if d.name == (config.validation.dataset or config.datasets[0].name))
    text_anchor = _text_anchor(config, loop_config["model_info"]["codecs"], device)
    clip_states = _clip_states(config, loop_config["model_info"]["pooled"], device)
    val_batches = validation_batches(loop_config.get("validation_rows"), val_spec, seed=config.validation.seed,
                                     device=device)

    shapes = {m: tuple(s) for m, s in loop_config["latent_shapes"].items() if m in unwrap(model).streams}
    flops_per_sample = model_cost(model_config, shapes).train_flops
    peak = peak_flops(device, config.peak_tflops)
    logs = None
    if rank == 0:
        logs = RunLogs(metrics_log=loop_config["metrics_log"], tensorboard_dir=loop_config["tensorboard_dir"],
                       storage=config.storage, upload_every_s=config.log.upload_every_s)

    meter = Meter()
    model.train()
    try:
        for step in range(start_step + 1, config.steps + 1):
            t0 = time.perf_counter()
            micro = micro_batches(mix, groups, step, grad_accum=config.optim.grad_accum, device=device)
            t1 = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(hash((config.seed, rank, step)) % 2**63)
            out = train_step(model, micro, optimizer=optimizer, scheduler=scheduler, objective=config.objective,
                             grad_clip=config.optim.grad_clip, precision=precision, generator=generator,
                             text_anchor=text_anchor, clip_states=clip_states)
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
            metrics = summarize(meter, step=step, world=world, lr=out.lr, flops_per_sample=flops_per_sample, peak=peak)
            metrics["skipped_rows"] = mix.skipped_rows
            if validate:
                metrics.update(_validate(model, ema, val_batches, config, precision, text_anchor))
            if rank == 0:
                _say(log_line(metrics))
                logs.write(metrics, upload=save)  # before the checkpoint: a restart from it finds these lines
            if save:
                with tempfile.TemporaryDirectory() as directory:
                    wrote = train_state.save(directory, model, optimizer, scheduler, ema, position=mix.position(),
                                             step=step, model_config=model_config, config=loop_config["config"],
                                             model_info=loop_config["model_info"])
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if wrote else None)
            else:
                ray.train.report(metrics)
            meter.reset()  # after validation and checkpointing: samples/s measures training steps only
    finally:  # what was logged reaches the run directory even when a step fails
        if logs is not None:
            logs.close()


def _streams(streams: dict[str, dict[str, Any]], config: TrainConfig, rank: int) -> list[Stream]:
    """This worker's rows of each stream the driver planned (`train_data.plan_streams`)."""
    import ray.train

    out = []
    for name, meta in streams.items():
        shard = ray.train.get_dataset_shard(shard_name(name, rank))
        out.append(Stream(
            name=name, weight=meta["weight"], tasks=meta["tasks"], synthetic=meta["synthetic"],
            open=lambda shard=shard: shard.iter_batches(
                batch_size=config.batch_size, batch_format="pyarrow", prefetch_batches=config.prefetch_batches
            ),
        ))
    return out


def _validate(model, ema, batches, config: TrainConfig, precision: str, text_anchor) -> dict[str, float]:
    """Validation losses of the model (`val/...`) and of its EMA weights (`val/ema_loss`)."""
    def loss() -> dict[str, float]:
        return validation_loss(model, batches, objective=config.objective, times=config.validation.times,
                               seed=config.validation.seed, precision=precision, text_anchor=text_anchor)

    model.eval()
    metrics = {f"val/{k}": v for k, v in loss().items()}
    if ema is not None:
        with ema.swapped(model):
            metrics["val/ema_loss"] = loss()["loss"]
    model.train()
    return metrics


def _text_anchor(config: TrainConfig, codecs: dict[str, Any], device: torch.device):
    """The frozen text decoder's cross-entropy, when `objective.text_anchor_weight` asks for it: the
    text VAE the latents were made with, on this worker's device."""
    if not config.objective.text_anchor_weight:
        return None
    return build_codec({**codecs["text"], "device": str(device)}).vae.caption_nll


def _clip_states(config: TrainConfig, pooled: dict[str, Any], device: torch.device):
    """Captions' CLIP hidden states, when `objective.rules.clip_prefix` asks for them: the text
    pooled encoder the latents were made with, on this worker's device."""
    if not config.objective.rules.prefixes_clip:
        return None
    encoder = build_codec({**pooled["text"], "device": str(device)})
    return lambda captions: encoder.encode(captions)[1]


def _say(line: str) -> None:
    # Ray Train routes print() to its logger and the console both; one copy is enough.
    sys.stdout.write(f"[train] {line}\n")
    sys.stdout.flush()
