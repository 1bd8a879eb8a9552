"""Exponential moving average of a model's parameters, kept beside the model, not inside it.

The shadow copy is float32 whatever the training dtype, keyed by the names of the unwrapped
module's `named_parameters()`, so its state dict loads into the bare model (and exports as a
model directory, see `omniflow.model_dir`). Wrappers are looked through: DDP's `.module` and
`torch.compile`'s `._orig_mod`. Nothing else about the model is assumed: every operation is an
elementwise tensor op between a parameter and its shadow, so FSDP2's sharded parameters
(DTensors) work too: each rank averages its own shard, the shadow holds DTensors
(`.full_tensor()` gathers one), and FSDP2 modules are resharded before the parameters are read
or written.

Why not a library's: `benchmarks/ema_options.py` (FSDP2 on two ranks) finds diffusers' `EMAModel`
failing after a forward without backward (validation leaves the root's weights gathered, and it
mixes them with its DTensor shadows) and keyed by position rather than by name, and
`torch.optim.swa_utils.AveragedModel` refused by FSDP2 (it deep-copies the model); this class is
exact in every layout there (docs/train.md).

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> ema = EMA(model, decay=0.9, start_step=0)
    >>> ema.update(model, step=1)                 # shadow = 0.9 * shadow + 0.1 * weights
    >>> with ema.swapped(model):                  # evaluate with the averaged weights
    ...     _ = model(torch.zeros(1, 2))
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributed.fsdp import FSDPModule

from omniflow.wrappers import unwrap


class EMAConfig(BaseModel):
    """decay: weight of the old average per update; start_step: before it the shadow just copies."""

    model_config = ConfigDict(extra="forbid")
    decay: float = Field(0.9999, ge=0.0, le=1.0)
    start_step: int = Field(0, ge=0)


def _reshard(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state: after a forward the root keeps its
    all-gathered parameters, which are not the `Parameter`s the EMA reads and writes, and which a
    later forward would reuse instead of gathering the shards again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class EMA:
    """Shadow parameters updated as shadow <- decay * shadow + (1 - decay) * param.

    Before `start_step` an update copies the parameters instead, so the average starts from the
    weights training has reached rather than from the initialisation.

    Example:
        >>> ema = EMA(model, decay=0.999, start_step=100)
        >>> for step in range(1, steps + 1):
        ...     train_step(model); ema.update(model, step)
        >>> ema_state = ema.state_dict()          # {param name: float32 tensor}
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, start_step: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.decay, self.start_step = decay, start_step
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().to(torch.float32, copy=True) for name, p in unwrap(model).named_parameters()
            }

    @classmethod
    def from_config(cls, model: nn.Module, config: EMAConfig) -> "EMA":
        return cls(model, decay=config.decay, start_step=config.start_step)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model = unwrap(model)
        _reshard(model)
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - params.keys()), sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"model does not match the EMA: missing {missing[:5]}, unexpected {extra[:5]}")
        return [(p, self.shadow[name]) for name, p in params.items()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current parameters into the average (call after each optimizer step)."""
        copy = step < self.start_step
        for p, s in self._pairs(model):
            if copy:
                s.copy_(p.detach())
            else:
                s.lerp_(p.detach().to(torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the average (cast to each parameter's dtype)."""
        for p, s in self._pairs(model):
            p.data.copy_(s)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the body with the EMA weights in `model`; the raw weights come back afterwards,
        also when the body raises."""
        pairs = self._pairs(model)
        with torch.no_grad():
            raw = [p.detach().clone() for p, _ in pairs]
            for p, s in pairs:
                p.data.copy_(s)
        try:
            yield model
        finally:
            _reshard(unwrap(model))
            with torch.no_grad():
                for (p, _), saved in zip(pairs, raw):
                    p.data.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: float32 shadow}: loadable into the bare model with strict=False
        (buffers are not averaged and come from the model's own state dict)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a saved average; names and shapes must match the model this EMA was built on."""
        if state.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - state.keys()), sorted(state.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise ValueError(
                    f"EMA state {name} has shape {tuple(value.shape)}, the model {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(value)
