"""A live training run's state to and from a training checkpoint (format in `omniflow.model_dir`):
model, optimizer, LR schedule, EMA and every rank's data position.

`save` is a collective (every rank calls it). An FSDP2 run writes the checkpoint sharded with
`torch.distributed.checkpoint`: each rank writes its own shard of the weights, optimizer state
and EMA into its directory, nothing is gathered, and the directories of all ranks together are
the checkpoint (Ray Train merges the directories its workers report). Any other run gathers its
state whole, and rank 0 writes it. `restore` loads either kind into a freshly parallelized model
on any number of ranks: a sharded checkpoint is resharded to the new layout as it loads.

    >>> wrote = save(directory, model, optimizer, scheduler, ema, position=mix.position(), step=step,
    ...              model_config=transformer_config(model))
    >>> if wrote: ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    >>> step, position = restore(directory, model, optimizer, scheduler, ema)
"""

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from omniflow.model_dir import (
    SHARDED_DIR,
    load_training_checkpoint,
    read_checkpoint_state,
    save_training_checkpoint,
    write_checkpoint_state,
)
from omniflow.parallelize import (
    full_model_state,
    full_optimizer_state,
    full_tensor,
    is_sharded,
    load_full_state,
    shard_like,
)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _positions(position: Any) -> list[Any]:
    """Every rank's data position, in rank order (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [position]
    positions = [None] * dist.get_world_size()
    dist.all_gather_object(positions, position)
    return positions


def save(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ema, *,
         position: Any, step: int, model_config: dict[str, Any], **state: Any) -> bool:
    """Write this rank's part of a checkpoint into `directory` (a collective: every rank calls it).

    Returns whether this rank wrote files (every rank of a sharded run; rank 0 otherwise). `state`
    is what `model_dir.write_checkpoint_state` takes beside (config, model_info)."""
    positions = _positions(position)
    fields = {"model_config": model_config, "step": step, "data_position": positions,
              "scheduler_state": scheduler.state_dict(), **state}
    if is_sharded(model):
        shards = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        if ema is not None:
            shards["ema"] = ema.state_dict()
        dcp.save(shards, checkpoint_id=str(Path(directory) / SHARDED_DIR))
        if _rank() == 0:  # after every shard: dcp.save ends with a barrier
            write_checkpoint_state(directory, sharded={"ema": ema is not None}, **fields)
        return True
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    ema_state = {k: full_tensor(v) for k, v in ema.state_dict().items()} if ema is not None else None
    if _rank() != 0:
        return False
    save_training_checkpoint(directory, model_state=model_state, optimizer_state=optimizer_state, ema_state=ema_state,
                             **fields)
    return True


def restore(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ema
            ) -> tuple[int, Any]:
    """Load the checkpoint in `directory` into a (possibly sharded) model, its optimizer, schedule
    and EMA; return its step and this rank's data position (None when the checkpoint holds fewer
    ranks: that rank starts its streams over).

    The schedule keeps this run's shape and peak (a continued run may have more steps); only its
    step count comes from the checkpoint, from its state or, for checkpoints written before that
    was kept, from the step."""
    state = read_checkpoint_state(directory)
    if state["sharded"] is not None:
        _load_sharded(Path(directory) / SHARDED_DIR, model, optimizer, ema if state["sharded"]["ema"] else None)
    else:
        whole = load_training_checkpoint(directory)
        load_full_state(model, optimizer, whole["model"], whole["optimizer"])
        if ema is not None and whole["ema"] is not None:
            ema.load_state_dict({k: shard_like(v, ema.shadow[k]) for k, v in whole["ema"].items()})
    if state["scheduler"] is not None:
        scheduler.load_state_dict({k: v for k, v in state["scheduler"].items() if k != "base_lrs"})
    else:
        scheduler.last_epoch = state["step"]
    with warnings.catch_warnings():  # get_lr outside step() is what is meant: this run's LR at this step
        warnings.simplefilter("ignore", UserWarning)
        lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    positions = state["data_position"] or []
    rank = _rank()
    return state["step"], positions[rank] if rank < len(positions) else None


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
    """Read a sharded checkpoint into the live state, resharded to this run's layout (a collective)."""
    target = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        target["ema"] = ema.state_dict()
    dcp.load(target, checkpoint_id=str(path))
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, optimizer, target["optimizer"])
    if ema is not None:
        ema.load_state_dict(target["ema"])
