"""Apply activation checkpointing, compilation and data parallelism to a transformer from outside.

The model file holds the architecture only; how it runs on a cluster is decided here. Every
option keeps parameter names unchanged, so checkpoints, EMA and merging see the same keys with
and without them.

    >>> model = parallelize(model, ParallelConfig(strategy="fsdp", activation_checkpointing=True),
    ...                     device=torch.device("cuda", local_rank))
"""

import functools
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

from omniflow.transformer import OmniFlowTransformer
from omniflow.wrappers import unwrap


class ParallelConfig(BaseModel):
    """strategy: "ddp" replicates the model; "fsdp" shards parameters, gradients and optimizer
    state per block (FSDP2 `fully_shard`); "none" runs one process."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["none", "ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    compile: bool = False


def apply_activation_checkpointing(model: OmniFlowTransformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: OmniFlowTransformer) -> None:
    """Compile block by block: the blocks repeat, so one compiled graph serves them all."""
    for block in model.blocks:
        block.compile()


def apply_fsdp(model: OmniFlowTransformer, *, mixed_precision: torch.dtype | None = None,
               streams_may_be_skipped: bool = False) -> nn.Module:
    """Shard each block, then the rest of the model (FSDP2 `fully_shard`).

    FSDP2 reduce-scatters the gradients a rank has, so ranks whose batches leave different
    streams out (`skip_absent`) would send different sizes and fail ("Received data size doesn't
    match expected size"). With `streams_may_be_skipped`, every parameter of a unit enters its
    forward's graph with weight zero (`include_every_parameter`): a stream left out gets a zero
    gradient on that rank, and every rank reduces the same tensors. (AdamW then moves such a
    stream by its momentum in that step, as it would under DDP when another rank used it.)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": policy} if policy else {}
    for block in model.blocks:
        if streams_may_be_skipped:
            include_every_parameter(block)
        fully_shard(block, **kwargs)
    if streams_may_be_skipped:
        include_every_parameter(model, skip="blocks.")
    return fully_shard(model, **kwargs)


def include_every_parameter(module: nn.Module, *, skip: str | None = None) -> None:
    """Add zero times the sum of `module`'s parameters (those whose names do not start with
    `skip`) to the first tensor of each forward's output (a dict), so that a backward pass gives
    every one of them a gradient. Registered before `fully_shard`, the hook runs while FSDP2 holds
    the unit's parameters gathered, before it reshards them."""

    def hook(mod: nn.Module, args, output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not torch.is_grad_enabled():
            return output
        params = [p for n, p in mod.named_parameters() if p.requires_grad and not (skip and n.startswith(skip))]
        if not params:
            return output
        zero = torch.stack([p.sum() for p in params]).sum() * 0
        first = next(iter(output))
        return {**output, first: output[first] + zero.to(output[first].dtype)}

    module.register_forward_hook(hook)


def parallelize(
    model: OmniFlowTransformer,
    config: ParallelConfig,
    *,
    device: torch.device,
    mixed_precision: torch.dtype | None = None,
    streams_may_be_skipped: bool = False,
) -> nn.Module:
    """Move `model` to `device` and apply `config`; DDP and FSDP need a process group.

    `streams_may_be_skipped`: some steps leave a stream out of the forward pass (the objective's
    `skip_absent`), so DDP must look for parameters without gradients, and FSDP must give them
    zero ones (`apply_fsdp`). DDP in a group of one
    process has nothing to synchronise and is left out (as Ray Train's `prepare_model` does).
    """
    model.to(device)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.compile:
        apply_compile(model)
    if config.strategy == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"strategy {config.strategy!r} needs torch.distributed to be initialised")
    if config.strategy == "fsdp":
        return apply_fsdp(model, mixed_precision=mixed_precision, streams_may_be_skipped=streams_may_be_skipped)
    if dist.get_world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=streams_may_be_skipped
    )


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on the CPU (a collective under FSDP: every rank calls it)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or not is_sharded(model):
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict, optimizer_state: dict | None) -> None:
    """Load unsharded states into a (possibly sharded) model and its optimizer."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered whole (a collective), or the tensor itself; on the CPU."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: sharded the same way when `like` is a DTensor."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is FSDP2-sharded (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
