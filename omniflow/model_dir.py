"""Model directories (what serving loads) and training checkpoints (what training resumes from).

A model directory is self-contained, in diffusers' pipeline layout: one `save_pretrained`
subfolder per component, safetensors weights, and an index:

    model_index.json     {"_class_name": "OmniFlowPipeline", component: [module, class], ...};
                         written last, so its presence marks a whole directory
    transformer/         config.json + diffusion_pytorch_model.safetensors (sharded when large)
    image_codec/ audio_codec/ text_codec/    each codec's weights, as its loader reads them
    text_pooled/ ...     pooled-vector encoders, when the model has them
    omniflow.json        what generation needs beside the weights, e.g.
                         {"preset": "toy", "latent_shapes": {"image": [4, 8, 8], ...},
                          "codecs": {"image": {"kind": "image-vae", "path": "image_codec", ...}, ...},
                          "pooled": {...}}
    merge.json           optional: the recipe of a merged model (`omniflow.merge`)

Codec and pooled-encoder configs name their weights by paths relative to the directory, so a copy
of it (another machine, a bucket, an image) generates as the original did. `save_model_dir` copies
every local directory the configs name into the new directory and rewrites the paths;
`read_model_info` turns them back into absolute paths. A hub id stays a reference (it is loaded
from the local hub cache). Directories written before the index existed (transformer files at
the top level) still load.

A training checkpoint is a directory with, when written whole (a run on one process or DDP):

    model.safetensors    the raw model weights (full, unsharded state dict)
    ema.safetensors      optional: the EMA shadow, {parameter name: float32} (`omniflow.ema`)
    optimizer.pt         optional: `optimizer.state_dict()` via torch.save; read with weights_only=True
    state.json           {"step": int, "data_position": any JSON, "config": the run's config,
                          "model_config": the transformer's config, "model_info": what an export
                          writes as omniflow.json, "scheduler": the LR scheduler's state_dict};
                          written last, so a directory without it is incomplete and is never
                          read as a checkpoint

or, when an FSDP2 run writes it sharded (every rank its own shard, nothing gathered):

    sharded/             a `torch.distributed.checkpoint` directory (.metadata, __<rank>_0.distcp)
                         of {"model": weights, "optimizer": state keyed by parameter name,
                         "ema": the EMA shadow (when state.json's "sharded" says so)}
    state.json           as above, with "sharded": {"ema": bool}

A sharded checkpoint loads into a run on any number of ranks (`omniflow.train_state.restore`), and
whole onto one process for exports, merges and `model.init` (`load_training_checkpoint`).

Both are written into a hidden temp directory beside the target and moved into place whole.
`publish_model_dir` copies a finished directory to a local path or a bucket the same way (on S3
the index goes last, after everything it indexes), and `fetch_model_dir` gives a local directory
for a local or s3:// one, downloaded once per machine.

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

from omniflow import storage as st
from omniflow.transformer import OmniFlowTransformer
from omniflow.wrappers import unwrap

INFO_FILE, MODEL_INDEX, TRANSFORMER = "omniflow.json", "model_index.json", "transformer"
PIPELINE_CLASS = "OmniFlowPipeline"
# omniflow.json entries that map modality -> codec config, and the suffix of their subfolders
COMPONENT_GROUPS = {"codecs": "codec", "pooled": "pooled"}
MODEL_WEIGHTS, EMA_WEIGHTS, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"
SHARDED_DIR = "sharded"
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


def publish_model_dir(local: str | os.PathLike, dest: str, storage: st.StorageConfig | None = None) -> None:
    """Copy the finished directory `local` (a model directory or a checkpoint) to `dest`, local or
    s3://, replacing what was there. Locally the copy is swapped in whole; on S3 the old prefix is
    removed first and `model_index.json` / `state.json` are written after every other file, so
    that their presence marks a whole copy."""
    storage = storage or st.StorageConfig()
    if st.scheme(dest) == "file":
        if Path(dest).absolute() != Path(local).absolute():
            _write_dir_atomic(dest, lambda temp: shutil.copytree(local, temp, dirs_exist_ok=True))
        return
    st.remove(dest, storage)
    st.upload_dir(local, dest, storage, last=[MODEL_INDEX, STATE_FILE])


def fetch_model_dir(path: str | os.PathLike, storage: st.StorageConfig | None = None) -> Path:
    """A local directory holding what `path` holds: `path` itself when local; for s3:// a copy
    downloaded once per machine and content listing (`omniflow.storage.local_copy`), so that a
    model published again to the same prefix is fetched again."""
    return Path(st.local_copy(str(path), storage or st.StorageConfig()))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def save_model_dir(
    model: OmniFlowTransformer,
    path: str | os.PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
    sidecars: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as a model directory (layout in the module docstring), replacing `path` whole.

    Args:
        model: the transformer, possibly wrapped (DDP, torch.compile); its full weights must be on
            this process (gather FSDP shards first).
        extra: written as `omniflow.json` (preset, latent shapes, codec configs, ...); every local
            directory its `codecs` and `pooled` configs name is copied in (`bundle_components`).
        sidecars: more JSON files, file name -> content (e.g. {"merge.json": recipe}).

    Example:
        >>> save_model_dir(model, "models/toy", extra={"preset": "toy", "codecs": toy_codec_configs("runs/toy/codecs")})
    """
    model = unwrap(model)

    def fill(temp: Path) -> None:
        model.save_pretrained(temp / TRANSFORMER, safe_serialization=True)
        info = bundle_components(extra, temp) if extra is not None else None
        if info is not None:
            _write_json(temp / INFO_FILE, info)
        for name, content in (sidecars or {}).items():
            _write_json(temp / name, content)
        _write_json(temp / MODEL_INDEX, model_index(model, info or {}))

    return _write_dir_atomic(path, fill)


def _component_dirs(config: Mapping[str, Any]) -> dict[str, list[str]]:
    from omniflow.codecs.base import codec_config

    return codec_config(dict(config)).weight_dirs()


def bundle_components(info: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """`info` with each codec / pooled-encoder config's local weights (the directories and files its
    `weight_dirs` names) copied under `root` and named
    by paths relative to it: `<modality>_codec/` (and `<modality>_codec_<field>/` for a second
    location such as a vocoder's). Paths that are not local directories (hub ids) stay as they are."""
    out = dict(info)
    for group, suffix in COMPONENT_GROUPS.items():
        if group not in info:
            continue
        out[group] = {}
        for modality, config in info[group].items():
            config, name = dict(config), f"{modality}_{suffix}"
            for field, parts in _component_dirs(config).items():
                source = config.get(field)
                if not isinstance(source, str) or not Path(source).is_dir():
                    continue
                dest = name if field == "path" else f"{name}_{field.removesuffix('_path')}"
                for part in parts:
                    if (Path(source) / part).is_file():
                        (root / dest / part).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(Path(source) / part, root / dest / part)
                    else:
                        shutil.copytree(Path(source) / part, root / dest / part, dirs_exist_ok=True)
                config[field] = dest
            out[group][modality] = config
    return out


def model_index(model: OmniFlowTransformer, info: Mapping[str, Any]) -> dict[str, Any]:
    """`model_index.json`: the pipeline class and each component's [library, class] (diffusers' index)."""
    import diffusers

    from omniflow.codecs.base import codec_class

    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                             TRANSFORMER: [type(model).__module__, type(model).__name__]}
    for group, suffix in COMPONENT_GROUPS.items():
        for modality, config in info.get(group, {}).items():
            cls = codec_class(config["kind"])
            index[f"{modality}_{suffix}"] = [cls.__module__, cls.__name__]
    return index


def read_model_info(path: str | os.PathLike, *, resolve: bool = True) -> dict[str, Any]:
    """The directory's `omniflow.json` ({} when it has none). With `resolve`, the component paths
    that point inside the directory are made absolute, so the configs load from wherever it is."""
    root = Path(path).absolute()
    file = root / INFO_FILE
    if not file.exists():
        return {}
    info = json.loads(file.read_text())
    for group in COMPONENT_GROUPS if resolve else ():
        for config in info.get(group, {}).values():
            for field in _component_dirs(config):
                value = config.get(field)
                if isinstance(value, str) and not Path(value).is_absolute() and (root / value).is_dir():
                    config[field] = str(root / value)
    return info


def transformer_dir(path: str | os.PathLike) -> Path:
    """Where the transformer's config.json and weights are: `transformer/`, or the top level of a
    directory written before the index existed."""
    path = Path(path)
    return path / TRANSFORMER if (path / TRANSFORMER / "config.json").is_file() else path


def is_model_dir(path: str | os.PathLike) -> bool:
    weights = transformer_dir(path)
    return (weights / "config.json").is_file() and any(weights.glob(f"{WEIGHTS_PREFIX}*.safetensors"))


def load_model_dir(
    path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
) -> OmniFlowTransformer:
    """Load a model directory's transformer with diffusers' `from_pretrained` (safetensors only), in
    eval mode.

    Example:
        >>> model = load_model_dir("models/toy", dtype="bfloat16", device="cuda")
    """
    if not is_model_dir(path):
        raise FileNotFoundError(
            f"{path} is not a model directory (needs {TRANSFORMER}/config.json and {WEIGHTS_PREFIX}*.safetensors)")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = OmniFlowTransformer.from_pretrained(transformer_dir(path), torch_dtype=dtype, use_safetensors=True)
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
    scheduler_state: Mapping[str, Any] | None = None,
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
        write_checkpoint_state(temp, model_config=model_config, step=step, data_position=data_position,
                               config=config, model_info=model_info, scheduler_state=scheduler_state)

    return _write_dir_atomic(path, fill)


def write_checkpoint_state(
    path: str | os.PathLike,
    *,
    model_config: Mapping[str, Any],
    step: int,
    data_position: Any = None,
    config: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    sharded: Mapping[str, bool] | None = None,
) -> None:
    """Write a checkpoint's `state.json` into `path`, the last file of a checkpoint: for a sharded
    one, after `sharded/` (`sharded` = {"ema": whether it holds the EMA})."""
    state = {"step": step, "data_position": data_position, "config": dict(config or {}),
             "model_config": dict(model_config), "model_info": dict(model_info or {}),
             "scheduler": dict(scheduler_state) if scheduler_state is not None else None}
    if sharded is not None:
        state["sharded"] = dict(sharded)
    _write_json(Path(path) / STATE_FILE, state)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / STATE_FILE).is_file() and ((path / MODEL_WEIGHTS).is_file() or is_sharded_checkpoint(path))


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint at `path` was written sharded (by an FSDP2 run)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's `state.json` (a checkpoint written before the scheduler's state was kept
    reads "scheduler": None)."""
    return {"scheduler": None, "sharded": None, **json.loads((Path(path) / STATE_FILE).read_text())}


def load_training_checkpoint(path: str | os.PathLike, *, optimizer: bool = True) -> dict[str, Any]:
    """Read a training checkpoint onto the CPU, whole.

    Returns:
        {"model": state dict, "ema": state dict or None, "optimizer": state dict or None,
         "step": int, "data_position": ..., "config": dict, "model_config": dict, "model_info": dict,
         "scheduler": state dict or None (checkpoints written before it was kept have none),
         "sharded": None, or {"ema": bool} for a sharded checkpoint}

    A sharded checkpoint's optimizer state is never read here (it loads into a live run,
    `omniflow.train_state.restore`); its weights and EMA are gathered whole on this process.

    Example:
        >>> ckpt = load_training_checkpoint("ckpt/step-100")
        >>> model.load_state_dict(ckpt["model"]); optimizer.load_state_dict(ckpt["optimizer"])
    """
    path = Path(path)
    if not is_training_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a training checkpoint (needs {STATE_FILE} and {MODEL_WEIGHTS} or {SHARDED_DIR}/)")
    state = read_checkpoint_state(path)
    if state["sharded"] is not None:
        return {**state, **_load_sharded_weights(path, state), "optimizer": None}
    has_ema, has_optimizer = (path / EMA_WEIGHTS).is_file(), (path / OPTIMIZER_FILE).is_file()
    return {
        **state,
        "model": load_file(path / MODEL_WEIGHTS),
        "ema": load_file(path / EMA_WEIGHTS) if has_ema else None,
        "optimizer": torch.load(path / OPTIMIZER_FILE, weights_only=True) if optimizer and has_optimizer else None,
    }


def _load_sharded_weights(path: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """{"model": ..., "ema": ... or None} of a sharded checkpoint, whole, read without a process
    group into tensors shaped by the transformer's config."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        skeleton = OmniFlowTransformer(**state["model_config"])
    skeleton.to_empty(device="cpu")
    target = {"model": skeleton.state_dict()}
    if state["sharded"].get("ema"):
        target["ema"] = {name: torch.empty(p.shape, dtype=torch.float32) for name, p in skeleton.named_parameters()}
    dcp.load(target, checkpoint_id=str(path / SHARDED_DIR), no_dist=True)
    return {"model": target["model"], "ema": target.get("ema")}


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
