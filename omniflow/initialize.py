"""The transformer a training run starts from: a fresh preset, a model directory, a training
checkpoint (its EMA weights by default), or SD3's MMDiT converted.

    >>> model = initial_transformer(None, preset="toy", seed=0)               # fresh
    >>> model = initial_transformer("s3://bucket/runs/stage1/model", storage=storage)
    >>> model = initial_transformer("sd3:stabilityai/stable-diffusion-3-medium-diffusers")
"""

from typing import Any

import torch

from omniflow import storage as st
from omniflow.model_dir import (
    checkpoint_weights,
    fetch_model_dir,
    is_model_dir,
    is_training_checkpoint,
    load_model_dir,
    load_training_checkpoint,
    model_from_state_dict,
)
from omniflow.presets import build_transformer

SD3_PREFIX = "sd3:"


def initial_transformer(
    init: str | None,
    *,
    preset: str = "toy",
    overrides: dict[str, Any] | None = None,
    storage: st.StorageConfig | None = None,
    seed: int = 0,
    use_ema: bool = True,
) -> torch.nn.Module:
    """The transformer on the CPU in float32. `init` None builds `preset` with `overrides`,
    initialised from `seed`; an s3:// `init` is downloaded first (`model_dir.fetch_model_dir`)."""
    overrides, storage = overrides or {}, storage or st.StorageConfig()
    if init is None:
        return build_transformer(preset, seed=seed, **overrides)
    if init.startswith(SD3_PREFIX):
        from omniflow.convert.sd3 import transformer_from_sd3

        return transformer_from_sd3(init.removeprefix(SD3_PREFIX), **overrides)
    if st.scheme(init) != "file":
        init = str(fetch_model_dir(init, storage))
    if is_training_checkpoint(init):
        state = load_training_checkpoint(init, optimizer=False)
        return model_from_state_dict(state["model_config"], checkpoint_weights(state, use_ema=use_ema))
    if is_model_dir(init):
        return load_model_dir(init, dtype=torch.float32, device="cpu")
    raise FileNotFoundError(f"model.init {init!r} is neither a model directory nor a training checkpoint")
