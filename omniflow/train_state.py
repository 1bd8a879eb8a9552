"""A live training run's state to and from a training checkpoint (`omniflow.model_dir`): model,
optimizer, LR schedule, EMA and every rank's data position.

`gather` is a collective (under FSDP2 the shards are gathered whole onto the CPU; the data
positions of all ranks are gathered too): every rank calls it, rank 0 writes what it returns.
`restore` loads a checkpoint read with `model_dir.load_training_checkpoint` into a freshly
parallelized model on any world size.

    >>> state = gather(model, optimizer, scheduler, ema, position=mix.position())
    >>> if rank == 0: save_training_checkpoint(directory, **state.checkpoint_fields(), step=step, ...)
    >>> restore(load_training_checkpoint(directory), model, optimizer, scheduler, ema)
"""

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from omniflow.parallelize import (
    full_model_state,
    full_optimizer_state,
    full_tensor,
    load_full_state,
    shard_like,
)


@dataclass
class GatheredState:
    """Whole (unsharded) CPU states and the data position of each rank, in rank order."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    data_positions: list[Any]

    def checkpoint_fields(self) -> dict[str, Any]:
        """Keyword arguments of `model_dir.save_training_checkpoint`."""
        return {"model_state": self.model, "optimizer_state": self.optimizer, "scheduler_state": self.scheduler,
                "ema_state": self.ema, "data_position": self.data_positions}


def gather(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ema, *, position: Any) -> GatheredState:
    """The run's state, whole on every rank's CPU (a collective: every rank calls it)."""
    positions = [position]
    if dist.is_initialized() and dist.get_world_size() > 1:
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, position)
    return GatheredState(
        model=full_model_state(model),
        optimizer=full_optimizer_state(model, optimizer),
        scheduler=scheduler.state_dict(),
        ema={k: full_tensor(v) for k, v in ema.state_dict().items()} if ema is not None else None,
        data_positions=positions,
    )


def restore(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ema) -> None:
    """Load a training checkpoint into a (possibly sharded) model, its optimizer, schedule and EMA.

    The schedule keeps this run's shape and peak (a continued run may have more steps); only its
    step count comes from the checkpoint, from its state or, for checkpoints written before that
    was kept, from the step."""
    load_full_state(model, optimizer, checkpoint["model"], checkpoint["optimizer"])
    if ema is not None and checkpoint["ema"] is not None:
        ema.load_state_dict({k: shard_like(v, ema.shadow[k]) for k, v in checkpoint["ema"].items()})
    if checkpoint["scheduler"] is not None:
        scheduler.load_state_dict({k: v for k, v in checkpoint["scheduler"].items() if k != "base_lrs"})
    else:
        scheduler.last_epoch = checkpoint["step"]
    with warnings.catch_warnings():  # get_lr outside step() is what is meant: this run's LR at this step
        warnings.simplefilter("ignore", UserWarning)
        lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def data_position(checkpoint: dict[str, Any], rank: int) -> Any:
    """Where rank `rank` resumes reading (None when the checkpoint holds fewer ranks: it starts over)."""
    positions = checkpoint["data_position"] or []
    return positions[rank] if rank < len(positions) else None
