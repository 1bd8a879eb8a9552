"""Merging models: the staged recipe's stream merge, weighted averages, task arithmetic, export.

Every parameter of `OmniFlowTransformer` belongs to one stream, by name (`stream_of`):
`blocks.<i>.streams.<m>.*`, `time_embed.<m>.*` (modality m's timestep and pooled embedder) and
the top-level `<m>_embed`, `<m>_proj`, `<m>_norm_out`, `<m>_proj_out` layers belong to m; any
other name is "shared" (the current architecture has none: even the embedders that feed the
joint conditioning vector are per modality).

The rules, parameter by parameter (theta_i is model i's tensor):

    streams           image <- theta_1 (the image model)     audio <- theta_2 (the audio model)
                      text  <- (a_1 theta_1 + a_2 theta_2) / (a_1 + a_2)   a = text_weights
                      shared <- (b_1 theta_1 + b_2 theta_2) / (b_1 + b_2)   b = shared_weights
                      a stream only one model has comes from that model
    average           theta = sum_i w_i theta_i / sum_i w_i
    task_arithmetic   theta = theta_base + sum_i s_i (theta_i - theta_base)

Arithmetic runs in float32. `merge_model_dirs` applies a `MergeConfig` to model directories or
training checkpoints on disk (raw or EMA weights) and writes a model directory with the recipe
in `merge.json` beside the weights.

    >>> from omniflow.presets import build_transformer
    >>> stage1 = build_transformer("tiny", streams=("image", "text")).state_dict()
    >>> stage2 = build_transformer("tiny", streams=("text", "audio")).state_dict()
    >>> merged = merge_streams(stage1, stage2, text_weights=(0.5, 0.5))
    >>> sorted({stream_of(name) for name in merged})
    ['audio', 'image', 'text']
"""

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator

from omniflow.model_dir import (
    DTYPES,
    checkpoint_weights,
    is_model_dir,
    is_training_checkpoint,
    load_model_dir,
    load_training_checkpoint,
    model_from_state_dict,
    read_model_info,
    save_model_dir,
)

StateDict = Mapping[str, torch.Tensor]
STREAMS = ("image", "text", "audio")
SHARED = "shared"
MERGE_FILE = "merge.json"
IMAGE_MODEL, AUDIO_MODEL, AVERAGE = "image_model", "audio_model", "average"

_STREAM_NAME = re.compile(r"^(?:blocks\.\d+\.streams\.|time_embed\.)(image|text|audio)\.|^(image|text|audio)_")
# Transformer config fields that shape one stream's layers; every other field shapes them all.
_CONFIG_STREAM = {
    **dict.fromkeys(("sample_size", "patch_size", "in_channels", "out_channels", "pos_embed_max_size"), "image"),
    **dict.fromkeys(("audio_in_channels", "audio_sample_size", "audio_patch_size", "audio_pos_embed_max_size"), "audio"),
    **dict.fromkeys(("joint_attention_dim", "text_out_dim"), "text"),
}


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the parameter, field or path."""


def stream_of(name: str) -> str:
    """"image", "text", "audio" or "shared" for a parameter (or buffer) name of the transformer.

    Example:
        >>> stream_of("blocks.3.streams.audio.to_q.weight"), stream_of("time_embed.text.timestep_embedder.linear_1.bias")
        ('audio', 'text')
    """
    match = _STREAM_NAME.match(name)
    return (match.group(1) or match.group(2)) if match else SHARED


def _combine(name: str, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i in float32, cast back to the first tensor's dtype."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise MergeError(f"parameter {name} has mismatched shapes {[tuple(t.shape) for t in tensors]}")
    total = sum(w * t.to(torch.float32) for w, t in zip(weights, tensors))
    return (total / sum(weights)).to(tensors[0].dtype)


def _check_weights(weights: Sequence[float], count: int, what: str) -> None:
    if len(weights) != count:
        raise MergeError(f"{what}: {len(weights)} weights for {count} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"{what} must be non-negative with a positive sum, got {list(weights)}")


def _check_same_keys(state_dicts: Sequence[StateDict], labels: Sequence[str]) -> None:
    first = set(state_dicts[0])
    for sd, label in zip(state_dicts[1:], labels[1:]):
        if set(sd) != first:
            only = sorted(set(sd) ^ first)
            where = labels[0] if only[0] in first else label
            raise MergeError(f"parameter {only[0]} is only in {where} ({len(only)} names differ)")


def stream_sources(image_model_sd: StateDict, audio_model_sd: StateDict) -> dict[str, str]:
    """Where each stream of a stream merge comes from: "image_model", "audio_model" or "average".

    Streams neither model has are left out.
    """
    has = {IMAGE_MODEL: {stream_of(k) for k in image_model_sd}, AUDIO_MODEL: {stream_of(k) for k in audio_model_sd}}
    sources = {}
    for stream in (*STREAMS, SHARED):
        owner = {"image": IMAGE_MODEL, "audio": AUDIO_MODEL}.get(stream, AVERAGE)
        both = stream in has[IMAGE_MODEL] and stream in has[AUDIO_MODEL]
        if both:
            sources[stream] = owner
        elif stream in has[IMAGE_MODEL]:
            sources[stream] = IMAGE_MODEL
        elif stream in has[AUDIO_MODEL]:
            sources[stream] = AUDIO_MODEL
    return sources


def merge_streams(
    image_model_sd: StateDict,
    audio_model_sd: StateDict,
    *,
    text_weights: tuple[float, float] = (0.5, 0.5),
    shared_weights: tuple[float, float] = (0.5, 0.5),
) -> dict[str, torch.Tensor]:
    """The staged recipe's merge: image stream from model 1, audio from model 2, text and shared
    parameters averaged with their weights. A stream that only one model has is taken from it.

    Raises:
        MergeError (a ValueError): an averaged parameter that only one model has, or whose shapes
            differ, naming it.

    Example:
        >>> merged = merge_streams(stage1.state_dict(), stage2.state_dict(), text_weights=(0.7, 0.3))
    """
    _check_weights(text_weights, 2, "text_weights")
    _check_weights(shared_weights, 2, "shared_weights")
    models = {IMAGE_MODEL: image_model_sd, AUDIO_MODEL: audio_model_sd}
    weights = {"text": text_weights, SHARED: shared_weights}
    merged: dict[str, torch.Tensor] = {}
    for stream, source in stream_sources(image_model_sd, audio_model_sd).items():
        if source != AVERAGE:
            merged.update({k: v for k, v in models[source].items() if stream_of(k) == stream})
            continue
        mine = [{k: v for k, v in sd.items() if stream_of(k) == stream} for sd in models.values()]
        _check_same_keys(mine, list(models))
        for name in mine[0]:
            merged[name] = _combine(name, [mine[0][name], mine[1][name]], weights[stream])
    return merged


def weighted_average(state_dicts: Sequence[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """theta = sum_i w_i theta_i / sum_i w_i, parameter by parameter.

    Example:
        >>> soup = weighted_average([a.state_dict(), b.state_dict()], [0.75, 0.25])
    """
    if not state_dicts:
        raise MergeError("weighted_average needs at least one state dict")
    _check_weights(weights, len(state_dicts), "weights")
    labels = [f"model {i}" for i in range(len(state_dicts))]
    _check_same_keys(state_dicts, labels)
    return {name: _combine(name, [sd[name] for sd in state_dicts], weights) for name in state_dicts[0]}


def task_arithmetic(
    base: StateDict, finetuned_list: Sequence[StateDict], scales: Sequence[float]
) -> dict[str, torch.Tensor]:
    """theta = theta_base + sum_i s_i (theta_i - theta_base), parameter by parameter.

    Example:
        >>> merged = task_arithmetic(base.state_dict(), [t2a.state_dict(), i2a.state_dict()], [1.0, 0.5])
    """
    if len(scales) != len(finetuned_list) or not finetuned_list:
        raise MergeError(f"task_arithmetic: {len(scales)} scales for {len(finetuned_list)} fine-tuned models")
    _check_same_keys([base, *finetuned_list], ["the base", *(f"model {i}" for i in range(len(finetuned_list)))])
    merged = {}
    for name, theta_base in base.items():
        shapes = [tuple(sd[name].shape) for sd in finetuned_list]
        if any(s != tuple(theta_base.shape) for s in shapes):
            raise MergeError(f"parameter {name} has mismatched shapes {[tuple(theta_base.shape), *shapes]}")
        b = theta_base.to(torch.float32)
        delta = sum(s * (sd[name].to(torch.float32) - b) for s, sd in zip(scales, finetuned_list))
        merged[name] = (b + delta).to(theta_base.dtype)
    return merged


# ----------------------------------------------------------------------------- configs


class _Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def inputs(self) -> list[str]:
        raise NotImplementedError


class StreamsRecipe(_Recipe):
    """The staged recipe: image stream from `image_model`, audio from `audio_model`."""

    method: Literal["streams"]
    image_model: str
    audio_model: str
    text_weights: tuple[NonNegativeFloat, NonNegativeFloat] = (0.5, 0.5)
    shared_weights: tuple[NonNegativeFloat, NonNegativeFloat] = (0.5, 0.5)

    @model_validator(mode="after")
    def _positive(self) -> "StreamsRecipe":
        for name in ("text_weights", "shared_weights"):
            if sum(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must have a positive sum, got {list(getattr(self, name))}")
        return self

    def inputs(self) -> list[str]:
        return [self.image_model, self.audio_model]


class AverageRecipe(_Recipe):
    """Weighted average of compatible models (equal weights by default)."""

    method: Literal["average"]
    models: list[str] = Field(min_length=1)
    weights: list[NonNegativeFloat] | None = None

    @model_validator(mode="after")
    def _match(self) -> "AverageRecipe":
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.models)} models")
        if self.weights is not None and sum(self.weights) <= 0:
            raise ValueError(f"weights must have a positive sum, got {self.weights}")
        return self

    def inputs(self) -> list[str]:
        return list(self.models)


class TaskArithmeticRecipe(_Recipe):
    """base + sum_i scale_i (model_i - base)."""

    method: Literal["task_arithmetic"]
    base: str
    models: list[str] = Field(min_length=1)
    scales: list[float]

    @model_validator(mode="after")
    def _match(self) -> "TaskArithmeticRecipe":
        if len(self.scales) != len(self.models):
            raise ValueError(f"scales has {len(self.scales)} entries for {len(self.models)} models")
        return self

    def inputs(self) -> list[str]:
        return [self.base, *self.models]


class ExportRecipe(_Recipe):
    """One model unchanged: a training checkpoint's raw or EMA weights to a model directory."""

    method: Literal["export"]
    model: str

    def inputs(self) -> list[str]:
        return [self.model]


Recipe = Annotated[StreamsRecipe | AverageRecipe | TaskArithmeticRecipe | ExportRecipe, Field(discriminator="method")]


class MergeConfig(BaseModel):
    """What to merge and where to write it.

    Inputs are model directories or training checkpoints; from a checkpoint the merge takes its
    EMA weights (`checkpoint_weights: ema`) or its raw weights (`model`). The merged model is
    written in `dtype`.
    """

    model_config = ConfigDict(extra="forbid")
    output: str
    recipe: Recipe
    checkpoint_weights: Literal["ema", "model"] = "ema"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


# ----------------------------------------------------------------------------- model directories


@dataclass
class MergeInput:
    """One input's weights, transformer config and `omniflow.json` info."""

    path: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as JSON would give it back (tuples as lists), diffusers' private keys dropped."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def load_merge_input(path: str | os.PathLike, *, use_ema: bool) -> MergeInput:
    """Read a model directory, or a training checkpoint's EMA (use_ema) or raw weights."""
    if is_model_dir(path):
        model = load_model_dir(path, dtype=torch.float32)
        return MergeInput(str(path), model.state_dict(), _plain(model.config), read_model_info(path))
    if is_training_checkpoint(path):
        ckpt = load_training_checkpoint(path, optimizer=False)
        try:
            state = checkpoint_weights(ckpt, use_ema=use_ema)
        except ValueError as err:
            raise MergeError(f"{path}: {err} (set checkpoint_weights: model to use the raw weights)") from None
        return MergeInput(str(path), state, _plain(ckpt["model_config"]), ckpt.get("model_info") or {})
    raise MergeError(f"{path} is neither a model directory (config.json + safetensors) nor a training checkpoint")


def _same_configs(inputs: Sequence[MergeInput]) -> dict[str, Any]:
    first = inputs[0]
    for other in inputs[1:]:
        for key in sorted(set(first.config) | set(other.config)):
            if first.config.get(key) != other.config.get(key):
                raise MergeError(
                    f"config field {key} differs: {first.config.get(key)!r} in {first.path}, "
                    f"{other.config.get(key)!r} in {other.path}"
                )
    return first.config


def merge_stream_configs(image_model: MergeInput, audio_model: MergeInput, sources: Mapping[str, str]) -> dict[str, Any]:
    """The merged transformer's config: each stream's fields from the model that gave the stream;
    fields of averaged streams, and those every stream shares, must agree."""
    models = {IMAGE_MODEL: image_model, AUDIO_MODEL: audio_model}
    merged = {}
    for key in sorted((set(image_model.config) | set(audio_model.config)) - {"streams"}):
        stream = _CONFIG_STREAM.get(key, SHARED)
        source = sources.get(stream)
        if source in models:
            merged[key] = models[source].config[key]
            continue
        ours, theirs = image_model.config.get(key), audio_model.config.get(key)
        if (source == AVERAGE or stream == SHARED) and ours != theirs:
            raise MergeError(f"config field {key} differs: {ours!r} in the image model, {theirs!r} in the audio model")
        merged[key] = ours  # agreed, or a stream neither model has
    merged["streams"] = [s for s in STREAMS if s in sources]
    return merged


def _merge_info(image_model: MergeInput, audio_model: MergeInput, sources: Mapping[str, str]) -> dict[str, Any]:
    """`omniflow.json` of a stream merge: per-modality entries (latent shapes, codecs, ...) from
    the model that gave that stream, everything else from the image model first."""
    merged = {**audio_model.info, **image_model.info}
    models = {IMAGE_MODEL: image_model, AUDIO_MODEL: audio_model, AVERAGE: image_model}
    for key, value in merged.items():
        if not (isinstance(value, dict) and value and set(value) <= set(STREAMS)):
            continue
        per_modality = {}
        for m in STREAMS:
            preference = [models[sources[m]]] if m in sources else []
            for model in (*preference, image_model, audio_model):
                if m in model.info.get(key, {}):
                    per_modality[m] = model.info[key][m]
                    break
        merged[key] = per_modality
    return merged


@dataclass
class Merged:
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    info: dict[str, Any]
    record: dict[str, Any]


def _numel_by(state: StateDict, key: Callable[[str], str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, t in state.items():
        counts[key(name)] = counts.get(key(name), 0) + t.numel()
    return counts


def merge_recipe(recipe: Recipe, load: Callable[[str], MergeInput]) -> Merged:
    """Apply a recipe to inputs read with `load(path)`; the record says what came from where."""
    if isinstance(recipe, StreamsRecipe):
        image_model, audio_model = load(recipe.image_model), load(recipe.audio_model)
        sources = stream_sources(image_model.state, audio_model.state)
        state = merge_streams(
            image_model.state, audio_model.state, text_weights=recipe.text_weights, shared_weights=recipe.shared_weights
        )
        config = merge_stream_configs(image_model, audio_model, sources)
        record = {"stream_sources": sources, "elements_by_source": _numel_by(state, lambda n: sources[stream_of(n)])}
        return Merged(state, config, _merge_info(image_model, audio_model, sources), record)
    if isinstance(recipe, AverageRecipe):
        inputs = [load(p) for p in recipe.models]
        weights = recipe.weights or [1.0] * len(inputs)
        state = weighted_average([i.state for i in inputs], weights)
        record = {"normalised_weights": [w / sum(weights) for w in weights]}
        return Merged(state, _same_configs(inputs), inputs[0].info, record)
    if isinstance(recipe, TaskArithmeticRecipe):
        inputs = [load(p) for p in recipe.inputs()]
        state = task_arithmetic(inputs[0].state, [i.state for i in inputs[1:]], recipe.scales)
        return Merged(state, _same_configs(inputs), inputs[0].info, {})
    source = load(recipe.model)
    return Merged(source.state, source.config, source.info, {})


def merge_model_dirs(
    config: MergeConfig,
    *,
    resolve: Callable[[str], str | os.PathLike] | None = None,
    write_to: str | os.PathLike | None = None,
) -> Path:
    """Merge model directories / training checkpoints on disk into a new model directory.

    Args:
        config: the recipe, the output path and the checkpoint weights and dtype to use.
        resolve: maps each input path of the recipe to a local directory (default: unchanged);
            `merge.json` records the paths as configured.
        write_to: write here instead of `config.output` (e.g. a local stage for an s3:// output).

    Returns:
        the model directory written, with `merge.json` beside the weights.

    Example:
        >>> config = MergeConfig.model_validate({"output": "models/merged", "recipe": {
        ...     "method": "streams", "image_model": "models/stage1", "audio_model": "models/stage2"}})
        >>> merge_model_dirs(config)
    """
    resolve = resolve or (lambda path: path)
    use_ema = config.checkpoint_weights == "ema"
    def load(path: str) -> MergeInput:  # errors name the path as configured, not a local copy
        return replace(load_merge_input(resolve(path), use_ema=use_ema), path=path)

    merged = merge_recipe(config.recipe, load)
    dtype = DTYPES[config.dtype]
    state = {name: t.to(dtype) for name, t in merged.state.items()}
    try:
        model = model_from_state_dict(merged.config, state)
    except RuntimeError as err:  # load_state_dict's message lists the missing / mismatched names
        raise MergeError(f"the merged weights do not fit the merged config: {err}") from None
    record = {
        "method": config.recipe.method,
        "recipe": config.recipe.model_dump(mode="json"),
        "checkpoint_weights": config.checkpoint_weights,
        "dtype": config.dtype,
        "elements": sum(t.numel() for t in state.values()),  # state-dict elements: parameters + position tables
        **merged.record,
    }
    return save_model_dir(model, write_to or config.output, extra=merged.info or None, sidecars={MERGE_FILE: record})
