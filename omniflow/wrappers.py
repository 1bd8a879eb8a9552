"""Seeing through the wrappers that training puts around a model."""

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
