"""Model directories (what serving loads) and training checkpoints (what training resumes from).

A model directory is diffusers' `save_pretrained` layout with safetensors, plus optional JSON
sidecars that `from_pretrained` ignores:

    config.json                            the transformer's config (diffusers)
    diffusion_pytorch_model.safetensors    weights (sharded with an index file when large)
    omniflow.json                          optional: what a server needs beside the weights, e.g.
                                           {"preset": "toy", "latent_shapes": {"image": [4, 8, 8], ...},
                                            "codecs": {"image": {...codec config...}, ...}}
    merge.json                             optional: the recipe of a merged model (`omniflow.merge`)

A training checkpoint is a directory with:

    model.safetensors    the raw model weights (full, unsharded state dict)
    ema.safetensors      optional: the EMA shadow, {parameter name: float32} (`omniflow.ema`)
    optimizer.pt         optional: `optimizer.state_dict()` via torch.save; read with weights_only=True
    state.json           {"step": int, "data_position": any JSON, "config": the run's config,
                          "model_config": the transformer's config, "model_info": what an export
                          writes as omniflow.json}; written last, so a directory without it is
                          incomplete and is never read as a checkpoint

Both are written into a hidden temp directory beside the target and moved into place whole.

    >>> from omniflow.presets import build_transformer
    >>> save_model_dir(build_transformer("tiny"), "models/tiny", extra={"preset": "tiny"})
    >>> model = load_model_dir("models/tiny", dtype=torch.float32, device="cpu")
"""

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omniflow.wrappers import unwrap
from omniflow.transformer import OmniFlowTransformer

INFO_FILE = "omniflow.json"
MODEL_WEIGHTS, EMA_WEIGHTS, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"
WEIGHTS_PREFIX = "diffusion_pytorch_model"  # diffusers' weights file name, also of its shards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(model: OmniFlowTransformer) -> dict[str, Any]:
    """The transformer's constructor arguments (diffusers' private `_...` keys left out)."""
    return {k: v for k, v in unwrap(model).config.items() if not k.startswith("_")}


def model_from_state_dict(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> OmniFlowTransformer:
    """A transformer holding exactly `state` (strict: every key, every shape), built without
    allocating a random initialisation first."""
    with torch.device("meta"):
        model = OmniFlowTransformer(**config)
    model.load_state_dict(dict(state), strict=True, assign=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a tensor was left unloaded"
    return model


def _write_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a hidden temp directory beside `path`, then swap it in for whatever was at `path`."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    try:
        temp.mkdir()
        fill(temp)
        if target.exists():
            os.replace(target, old)
        os.replace(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def save_model_dir(
    model: OmniFlowTransformer,
    path: str | os.PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
    sidecars: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as a model directory (diffusers layout, safetensors), replacing `path` whole.

    Args:
        model: the transformer, possibly wrapped (DDP, torch.compile); its full weights must be on
            this process (gather FSDP shards first).
        extra: written as `omniflow.json` (preset, latent shapes, codec configs, ...).
        sidecars: more JSON files, file name -> content (e.g. {"merge.json": recipe}).

    Example:
        >>> save_model_dir(model, "models/toy", extra={"preset": "toy"})
    """
    model = unwrap(model)

    def fill(temp: Path) -> None:
        model.save_pretrained(temp, safe_serialization=True)
        if extra is not None:
            _write_json(temp / INFO_FILE, dict(extra))
        for name, content in (sidecars or {}).items():
            _write_json(temp / name, content)

    return _write_dir_atomic(path, fill)


def read_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The directory's `omniflow.json`, or {} when it has none."""
    info = Path(path) / INFO_FILE
    return json.loads(info.read_text()) if info.exists() else {}


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file() and any(Path(path).glob(f"{WEIGHTS_PREFIX}*.safetensors"))


def load_model_dir(
    path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
) -> OmniFlowTransformer:
    """Load a model directory with diffusers' `from_pretrained` (safetensors only), in eval mode.

    Example:
        >>> model = load_model_dir("models/toy", dtype="bfloat16", device="cuda")
    """
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not a model directory (needs config.json and {WEIGHTS_PREFIX}*.safetensors)")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = OmniFlowTransformer.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_training_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    model_config: Mapping[str, Any],
    step: int,
    ema_state: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    data_position: Any = None,
    config: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint directory (format in the module docstring), replacing `path` whole.

    Example:
        >>> save_training_checkpoint("ckpt/step-100", model_state=model.state_dict(),
        ...     model_config=transformer_config(model), step=100, ema_state=ema.state_dict(),
        ...     optimizer_state=optimizer.state_dict(), data_position={"shard": 3, "row": 512})
    """

    def fill(temp: Path) -> None:
        save_file(_cpu(model_state), temp / MODEL_WEIGHTS)
        if ema_state is not None:
            save_file(_cpu(ema_state), temp / EMA_WEIGHTS)
        if optimizer_state is not None:
            torch.save(optimizer_state, temp / OPTIMIZER_FILE)
        state = {"step": step, "data_position": data_position, "config": dict(config or {}),
                 "model_config": dict(model_config), "model_info": dict(model_info or {})}
        _write_json(temp / STATE_FILE, state)

    return _write_dir_atomic(path, fill)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_FILE).is_file() and (Path(path) / MODEL_WEIGHTS).is_file()


def load_training_checkpoint(path: str | os.PathLike, *, optimizer: bool = True) -> dict[str, Any]:
    """Read a training checkpoint onto the CPU.

    Returns:
        {"model": state dict, "ema": state dict or None, "optimizer": state dict or None,
         "step": int, "data_position": ..., "config": dict, "model_config": dict, "model_info": dict}

    Example:
        >>> ckpt = load_training_checkpoint("ckpt/step-100")
        >>> model.load_state_dict(ckpt["model"]); optimizer.load_state_dict(ckpt["optimizer"])
    """
    path = Path(path)
    if not is_training_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a training checkpoint (needs {STATE_FILE} and {MODEL_WEIGHTS})")
    state = json.loads((path / STATE_FILE).read_text())
    has_ema, has_optimizer = (path / EMA_WEIGHTS).is_file(), (path / OPTIMIZER_FILE).is_file()
    return {
        **state,
        "model": load_file(path / MODEL_WEIGHTS),
        "ema": load_file(path / EMA_WEIGHTS) if has_ema else None,
        "optimizer": torch.load(path / OPTIMIZER_FILE, weights_only=True) if optimizer and has_optimizer else None,
    }


def checkpoint_weights(checkpoint_state: Mapping[str, Any], *, use_ema: bool) -> dict[str, torch.Tensor]:
    """The raw weights, or the EMA shadow completed with the raw buffers (buffers are not averaged)."""
    raw = checkpoint_state["model"]
    if not use_ema:
        return dict(raw)
    ema = checkpoint_state.get("ema")
    if ema is None:
        raise ValueError("use_ema=True but the checkpoint has no EMA weights")
    unknown = sorted(set(ema) - set(raw))
    if unknown:
        raise ValueError(f"EMA weights name parameters the model does not have: {unknown[:5]}")
    return {name: ema.get(name, value).to(value.dtype) for name, value in raw.items()}


def export_checkpoint(
    checkpoint_state: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    use_ema: bool,
    dtype: torch.dtype | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the raw or EMA weights of a training checkpoint as a model directory.

    `checkpoint_state` is what `load_training_checkpoint` returns (it needs "model",
    "model_config" and, with use_ema, "ema"). EMA weights take the raw weights' dtype unless
    `dtype` is given. `omniflow.json` gets `extra`, else the checkpoint's "model_info".

    Example:
        >>> export_checkpoint(load_training_checkpoint("ckpt/step-100"), "models/toy", use_ema=True)
    """
    state = checkpoint_weights(checkpoint_state, use_ema=use_ema)
    if dtype is not None:
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        state = {k: v.to(dtype) for k, v in state.items()}
    model = model_from_state_dict(checkpoint_state["model_config"], state)
    return save_model_dir(model, path, extra=extra if extra is not None else checkpoint_state.get("model_info") or None)
