"""Convert the public OmniFlow release (`OmniFlowTransformerModel`) into `OmniFlowTransformer`.

The converted model computes the reference's function in both of its conditioning modes (joint:
summed timestep embeddings; split: one per stream). The mapping is strict: every reference key is
either mapped, or one of a few known-unused keys that are dropped and reported, or an error.

Facts about the reference that the mapping encodes:

- `time_text_embed` embeds the IMAGE timestep and `time_image_embed` the TEXT timestep (the names
  are swapped relative to their use); `time_aud_embed` embeds the audio timestep.
- Its last block is "pre-only" for text, yet still holds `attn.add_q_proj`, `ff_context` and
  `norm2_context`, whose results are discarded: those keys are dropped.
- With audio and `qk_norm="layer_norm"` it has ONE `attn.norm_q` / `attn.norm_k` applied to every
  stream's queries / keys; with `"rms_norm"` (or without audio) each stream has its own.
- The audio latent grid is hard-coded to 256 x 16 with 2 x 2 patches and a 192-wide positional grid.
- A checkpoint saved with the text VAE attached carries it under `text_decoder.`: that is a separate
  model (the release also ships it on its own), so those keys are dropped too.
- Parameters are registered in a fixed order that its EMA file (`shadow_params`) follows; a
  safetensors file sorts its keys, so that order is rebuilt from the config, not read from a file.

Example:
    >>> config, state_dict = load_reference_dir("OmniFlow-v0.5", ema=True)  # doctest: +SKIP
    >>> model = transformer_from_reference(config, state_dict)  # doctest: +SKIP
"""

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from omniflow.convert.sd3 import (
    SD3_BLOCK_RENAMES,
    SD3_LAST_BLOCK_UNUSED,
    SD3_TOP_LEVEL_RENAMES,
    check_mmdit_config,
)
from omniflow.init import initialize_weights, zero_timestep_embedder
from omniflow.modality import Modality
from omniflow.state_dicts import preview
from omniflow.transformer import OmniFlowTransformer

REFERENCE_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "audio_input_dim": 8,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "decoder_config": "",
    "add_audio": True,
    "add_clip": False,
    "use_audio_mae": False,
    "drop_text": False,
    "drop_image": False,
    "drop_audio": False,
    "qk_norm": "layer_norm",
}
REFERENCE_TEXT_OUT_DIM = 1536  # the width of `text_output` before a text VAE is attached
REFERENCE_AUDIO_SAMPLE_SIZE = (256, 16)
REFERENCE_AUDIO_PATCH_SIZE = 2
REFERENCE_AUDIO_POS_EMBED_MAX_SIZE = 192
REFERENCE_QK_NORM_EPS = 1e-5  # the reference's attention modules use their default eps
TEXT_DECODER_PREFIX = "text_decoder."
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EMA_FILE = "ema_transformer.pt"

# The reference extends SD3: its image and text layers keep SD3's names. Prefixes end in "." so
# "norm_out." never matches "norm_out_text.".
_TOP_LEVEL_RENAMES = (
    *SD3_TOP_LEVEL_RENAMES,
    ("time_image_embed.", "time_embed.text."),  # sic: the reference embeds the TEXT timestep here
    ("time_aud_embed.", "time_embed.audio."),
    ("audio_embedder.", "audio_embed."),
    ("context_decoder.projection.", "text_proj."),
    ("norm_out_text.", "text_norm_out."),
    ("text_output.", "text_proj_out."),
    ("norm_out_aud.", "audio_norm_out."),
    ("proj_out_aud.", "audio_proj_out."),
)
_BLOCK_RENAMES = (  # reference suffix inside a block -> (our stream, our suffix)
    *SD3_BLOCK_RENAMES,
    ("norm1_audio.", Modality.AUDIO, "norm1."),
    ("attn.aud_q_proj.", Modality.AUDIO, "to_q."),
    ("attn.aud_k_proj.", Modality.AUDIO, "to_k."),
    ("attn.aud_v_proj.", Modality.AUDIO, "to_v."),
    ("attn.to_aud_out.", Modality.AUDIO, "to_out."),
    ("ff_audio.", Modality.AUDIO, "ff."),
    ("attn.norm_aud_q.", Modality.AUDIO, "norm_q."),
    ("attn.norm_aud_k.", Modality.AUDIO, "norm_k."),
)
_LAST_BLOCK_UNUSED = (*SD3_LAST_BLOCK_UNUSED, "ff_context.", "norm2_context.")
MODEL_STREAMS = {True: ("image", "text", "audio"), False: ("image", "text")}  # keyed by add_audio


@dataclass(frozen=True)
class ReferenceLayout:
    """What decides the reference's key set: depth, whether it has audio, and its qk norm."""

    num_layers: int
    add_audio: bool = True
    qk_norm: str | None = "layer_norm"

    @property
    def shared_qk_norm(self) -> bool:
        """The audio-capable attention shares one layer-norm pair across all streams."""
        return self.add_audio and self.qk_norm == "layer_norm"

    @property
    def streams(self) -> tuple[str, ...]:
        return MODEL_STREAMS[self.add_audio]


@dataclass
class ReferenceConversion:
    """A converted model and what the conversion did not copy one-to-one."""

    model: OmniFlowTransformer
    dropped_keys: list[str]  # reference keys whose values the reference never uses
    fresh_keys: list[str] = field(default_factory=list)  # our keys with no reference counterpart


def resolve_reference_config(ref_config: Mapping[str, Any]) -> dict[str, Any]:
    """The reference constructor's arguments with its defaults filled in, validated.

    Keys starting with "_" (diffusers metadata) are ignored; other unknown keys are ignored with a
    warning, as the reference class itself ignores them.
    """
    unknown = sorted(k for k in ref_config if not k.startswith("_") and k not in REFERENCE_DEFAULTS)
    if unknown:
        warnings.warn(
            f"ignoring reference config keys the reference class does not take: {unknown}"
        )
    cfg = {**REFERENCE_DEFAULTS, **{k: v for k, v in ref_config.items() if k in REFERENCE_DEFAULTS}}
    check_mmdit_config(cfg)
    for flag in ("add_clip", "drop_text", "drop_image", "drop_audio"):
        if cfg[flag]:
            raise ValueError(
                f"{flag}={cfg[flag]!r} is not supported: no OmniFlowTransformer variant"
            )
    if cfg["add_audio"] and cfg["use_audio_mae"]:
        raise ValueError(
            "use_audio_mae=True is not supported: OmniFlowTransformer patch-embeds audio"
        )
    return cfg


def config_from_reference(
    ref_config: Mapping[str, Any],
    *,
    split_timestep_conditioning: bool = False,
    text_out_dim: int = REFERENCE_TEXT_OUT_DIM,
) -> dict[str, Any]:
    """`OmniFlowTransformer` constructor kwargs equivalent to a reference config.

    `text_out_dim` is not in the reference config: it is the width of the checkpoint's
    `text_output` weight (1536, or the attached text VAE's width).

    Example:
        >>> cfg = config_from_reference({"num_layers": 2, "num_attention_heads": 2,
        ...     "attention_head_dim": 8, "caption_projection_dim": 16})
        >>> cfg["streams"], cfg["audio_sample_size"], cfg["qk_norm"]
        (('image', 'text', 'audio'), (256, 16), 'layer_norm')
    """
    cfg = resolve_reference_config(ref_config)
    return {
        "sample_size": cfg["sample_size"],
        "patch_size": cfg["patch_size"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"] or cfg["in_channels"],
        "num_layers": cfg["num_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "attention_head_dim": cfg["attention_head_dim"],
        "joint_attention_dim": cfg["joint_attention_dim"],
        "text_out_dim": text_out_dim,
        "pooled_projection_dim": cfg["pooled_projection_dim"],
        "pos_embed_max_size": cfg["pos_embed_max_size"],
        "audio_in_channels": cfg["audio_input_dim"],
        "audio_sample_size": REFERENCE_AUDIO_SAMPLE_SIZE,
        "audio_patch_size": REFERENCE_AUDIO_PATCH_SIZE,
        "audio_pos_embed_max_size": REFERENCE_AUDIO_POS_EMBED_MAX_SIZE,
        "streams": MODEL_STREAMS[bool(cfg["add_audio"])],
        "qk_norm": cfg["qk_norm"],
        "qk_norm_eps": REFERENCE_QK_NORM_EPS,
        "split_timestep_conditioning": split_timestep_conditioning,
    }


def layout_from_reference(ref_config: Mapping[str, Any]) -> ReferenceLayout:
    cfg = resolve_reference_config(ref_config)
    return ReferenceLayout(cfg["num_layers"], bool(cfg["add_audio"]), cfg["qk_norm"])


def _linear(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _norm(prefix: str, kind: str | None) -> list[str]:
    return {None: [], "layer_norm": _linear(prefix), "rms_norm": [f"{prefix}.weight"]}[kind]


def _timestep_embedder(prefix: str) -> list[str]:
    return [
        *_linear(f"{prefix}.timestep_embedder.linear_1"),
        *_linear(f"{prefix}.timestep_embedder.linear_2"),
        *_linear(f"{prefix}.text_embedder.linear_1"),
        *_linear(f"{prefix}.text_embedder.linear_2"),
    ]


def _feed_forward(prefix: str) -> list[str]:
    return [*_linear(f"{prefix}.net.0.proj"), *_linear(f"{prefix}.net.2")]


def _block_parameter_names(i: int, layout: ReferenceLayout) -> list[str]:
    b, last, qk = f"transformer_blocks.{i}", i == layout.num_layers - 1, layout.qk_norm
    names = [*_linear(f"{b}.norm1.linear"), *_linear(f"{b}.norm1_context.linear")]
    if layout.add_audio:  # the reference's own audio-capable attention module
        names += [*_norm(f"{b}.attn.norm_q", qk), *_norm(f"{b}.attn.norm_k", qk)]
        if qk == "rms_norm":
            for stream in ("added", "aud"):
                names += [
                    *_norm(f"{b}.attn.norm_{stream}_q", qk),
                    *_norm(f"{b}.attn.norm_{stream}_k", qk),
                ]
        for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj"):
            names += _linear(f"{b}.attn.{proj}")
        for proj in ("aud_k_proj", "aud_v_proj", "aud_q_proj", "to_aud_out", "to_out.0"):
            names += _linear(f"{b}.attn.{proj}")
        names += [] if last else _linear(f"{b}.attn.to_add_out")
    else:  # diffusers' `Attention`
        names += [*_norm(f"{b}.attn.norm_q", qk), *_norm(f"{b}.attn.norm_k", qk)]
        for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0"):
            names += _linear(f"{b}.attn.{proj}")
        names += [] if last else _linear(f"{b}.attn.to_add_out")
        names += [*_norm(f"{b}.attn.norm_added_q", qk), *_norm(f"{b}.attn.norm_added_k", qk)]
    names += [*_feed_forward(f"{b}.ff"), *_feed_forward(f"{b}.ff_context")]
    if layout.add_audio:
        names += [*_feed_forward(f"{b}.ff_audio"), *_linear(f"{b}.norm1_audio.linear")]
    return names


def reference_parameter_names(layout: ReferenceLayout) -> list[str]:
    """The reference model's parameter names in registration order (= `named_parameters()`).

    This is the order of an EMA file's `shadow_params`. A text VAE attached to the model
    (`text_decoder.*`) is registered after all of these.
    """
    names = [*_linear("pos_embed.proj"), *_timestep_embedder("time_text_embed")]
    if layout.add_audio:
        names += [
            *_timestep_embedder("time_image_embed"),
            *_linear("audio_embedder.proj"),
            *_timestep_embedder("time_aud_embed"),
            *_linear("norm_out_aud.linear"),
            *_linear("proj_out_aud"),
        ]
    names += _linear("context_embedder")
    if layout.add_audio:
        names += _linear("context_decoder.projection")
    names += _linear("text_output")
    for i in range(layout.num_layers):
        names += _block_parameter_names(i, layout)
    names += [*_linear("norm_out.linear"), *_linear("norm_out_text.linear"), *_linear("proj_out")]
    return names


def reference_buffer_names(layout: ReferenceLayout) -> list[str]:
    """Persistent buffers in the reference state dict: the sinusoidal positional tables."""
    return ["pos_embed.pos_embed", *(["audio_embedder.pos_embed"] if layout.add_audio else [])]


def _is_dropped(key: str, layout: ReferenceLayout) -> bool:
    last = f"transformer_blocks.{layout.num_layers - 1}."
    if key.startswith(TEXT_DECODER_PREFIX):
        return True
    return key.startswith(last) and key[len(last) :].startswith(_LAST_BLOCK_UNUSED)


def check_reference_keys(ref_sd: Mapping[str, torch.Tensor], layout: ReferenceLayout) -> None:
    """Raise ValueError naming every missing or unexpected key of a reference state dict."""
    expected = set(reference_parameter_names(layout)) | set(reference_buffer_names(layout))
    present = {k for k in ref_sd if not k.startswith(TEXT_DECODER_PREFIX)}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not match the reference layout for {layout}: "
            f"missing keys {preview(missing)}; unexpected keys {preview(unexpected)}"
        )


def _our_keys(key: str, layout: ReferenceLayout) -> list[str]:
    """Our key(s) for one used reference key (several when one qk norm serves every stream)."""
    for ref_prefix, our_prefix in _TOP_LEVEL_RENAMES:
        if key.startswith(ref_prefix):
            return [our_prefix + key[len(ref_prefix) :]]
    _, index, rest = key.split(".", 2)  # "transformer_blocks", i, suffix
    block = f"blocks.{index}.streams"
    if layout.shared_qk_norm and rest.startswith(("attn.norm_q.", "attn.norm_k.")):
        which, param = rest[len("attn.norm_") :].split(".", 1)
        last = int(index) == layout.num_layers - 1
        streams = [s for s in layout.streams if not (which == "q" and last and s == Modality.TEXT)]
        return [f"{block}.{s}.norm_{which}.{param}" for s in streams]
    for ref_suffix, stream, our_suffix in _BLOCK_RENAMES:
        if rest.startswith(ref_suffix):
            return [f"{block}.{stream}.{our_suffix}{rest[len(ref_suffix) :]}"]
    raise AssertionError(f"no rename rule for checked key {key}")


def state_dict_from_reference(
    ref_sd: Mapping[str, torch.Tensor],
    num_layers: int,
    *,
    add_audio: bool = True,
    qk_norm: str | None = "layer_norm",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a reference state dict to our key layout.

    Returns (our state dict, dropped reference keys). Dropped are exactly the last block's unused
    text-stream weights and an attached text VAE's `text_decoder.*`; any other missing or
    unexpected key raises ValueError. Tensors are shared, not copied.
    """
    layout = ReferenceLayout(num_layers, add_audio, qk_norm)
    check_reference_keys(ref_sd, layout)
    ours: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in ref_sd.items():
        if _is_dropped(key, layout):
            dropped.append(key)
            continue
        for our_key in _our_keys(key, layout):
            ours[our_key] = tensor
    return ours, dropped


def _fresh_prefixes(layout: ReferenceLayout) -> tuple[str, ...]:
    """Our modules the reference lacks: without audio, the text timestep embedder and text_proj."""
    return () if layout.add_audio else ("time_embed.text.", "text_proj.")


def _check_shapes(model_sd: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> None:
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, v in ours.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    if bad:
        raise ValueError(f"shape mismatch after conversion: {bad}")


def convert_reference(
    ref_config: Mapping[str, Any],
    ref_state_dict: Mapping[str, torch.Tensor],
    *,
    split_timestep_conditioning: bool = False,
) -> ReferenceConversion:
    """Build our model from a reference config and state dict, reporting what was not copied.

    A reference without audio never embeds the text timestep: our text timestep embedder is then
    zeroed (the joint conditioning vector stays the reference's) and `text_proj` is initialised
    fresh; both are reported as `fresh_keys`.
    """
    layout = layout_from_reference(ref_config)
    if "text_output.weight" not in ref_state_dict:
        raise ValueError(
            "the state dict has no 'text_output.weight': is this a reference OmniFlow checkpoint?"
        )
    text_out_dim = ref_state_dict["text_output.weight"].shape[0]
    config = config_from_reference(
        ref_config,
        split_timestep_conditioning=split_timestep_conditioning,
        text_out_dim=text_out_dim,
    )
    ours, dropped = state_dict_from_reference(
        ref_state_dict, layout.num_layers, add_audio=layout.add_audio, qk_norm=layout.qk_norm
    )
    model = OmniFlowTransformer(**config)
    model_sd = model.state_dict()
    _check_shapes(model_sd, ours)
    fresh = sorted(k for k in model_sd if k.startswith(_fresh_prefixes(layout)))
    if fresh:
        initialize_weights(model)
        zero_timestep_embedder(model.time_embed[Modality.TEXT])
        ours |= {k: v for k, v in model.state_dict().items() if k in fresh}
    model.load_state_dict(ours, strict=True)
    return ReferenceConversion(model=model, dropped_keys=dropped, fresh_keys=fresh)


def transformer_from_reference(
    ref_config: Mapping[str, Any],
    ref_state_dict: Mapping[str, torch.Tensor],
    *,
    split_timestep_conditioning: bool = False,
) -> OmniFlowTransformer:
    """`OmniFlowTransformer` computing the same function as a reference checkpoint.

    Example:
        >>> config, state_dict = load_reference_dir("OmniFlow-v0.5")  # doctest: +SKIP
        >>> model = transformer_from_reference(config, state_dict)  # doctest: +SKIP
    """
    return convert_reference(
        ref_config, ref_state_dict, split_timestep_conditioning=split_timestep_conditioning
    ).model


def apply_reference_ema(
    ref_sd: Mapping[str, torch.Tensor], ema_state: Any, layout: ReferenceLayout
) -> dict[str, torch.Tensor]:
    """The reference state dict with its parameters replaced by an EMA file's shadow parameters.

    `ema_state` is a diffusers-style EMAModel state dict; its `shadow_params` list follows the
    reference's parameter registration order (`reference_parameter_names`). Trailing extra
    entries are allowed only when a text VAE is attached (`text_decoder.*`), which registers last.
    """
    shadow = ema_state.get("shadow_params") if isinstance(ema_state, Mapping) else None
    if not isinstance(shadow, list) or not all(isinstance(p, torch.Tensor) for p in shadow):
        raise ValueError(
            "the EMA file is not an EMAModel state dict with a 'shadow_params' list of tensors"
        )
    check_reference_keys(ref_sd, layout)
    names = reference_parameter_names(layout)
    has_decoder = any(k.startswith(TEXT_DECODER_PREFIX) for k in ref_sd)
    if len(shadow) < len(names) or (len(shadow) > len(names) and not has_decoder):
        raise ValueError(
            f"the EMA file holds {len(shadow)} shadow parameters but the reference transformer has "
            f"{len(names)} parameters{'' if has_decoder else ' (and no text_decoder)'}"
        )
    bad = [
        f"#{i} {name}: EMA {tuple(p.shape)} vs weights {tuple(ref_sd[name].shape)}"
        for i, (name, p) in enumerate(zip(names, shadow))
        if p.shape != ref_sd[name].shape
    ]
    if bad:
        raise ValueError(
            f"EMA shadow parameters do not line up with the reference parameters: {bad}"
        )
    return {**ref_sd, **dict(zip(names, shadow))}


def _transformer_dir(src: Path) -> Path:
    for candidate in (src / "transformer", src):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(
        f"{src} has neither transformer/config.json nor config.json: not a reference checkpoint"
    )


def _load_weights(transformer_dir: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = transformer_dir / name
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(state, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ValueError(f"{path} does not hold a state dict of tensors")
        return dict(state)
    raise ValueError(f"{transformer_dir} holds none of {list(WEIGHT_FILES)}")


def _ema_file(src: Path, transformer_dir: Path) -> Path:
    for path in (transformer_dir / EMA_FILE, src / EMA_FILE):
        if path.is_file():
            return path
    raise ValueError(f"no {EMA_FILE} in {transformer_dir} or {src}")


def load_reference_dir(
    src: str | Path, *, ema: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a reference checkpoint: (config, state dict), with EMA weights applied if `ema`.

    `src` is the release root or its `transformer/` folder. Weights come from
    `diffusion_pytorch_model.safetensors` or `.bin` (loaded with `weights_only=True`); the EMA from
    `ema_transformer.pt` in the transformer folder or the root.
    """
    src = Path(src)
    if not src.exists():
        raise ValueError(f"reference checkpoint path {src} does not exist")
    transformer_dir = _transformer_dir(src)
    config = json.loads((transformer_dir / "config.json").read_text())
    state_dict = _load_weights(transformer_dir)
    if ema:
        ema_state = torch.load(
            _ema_file(src, transformer_dir), weights_only=True, map_location="cpu"
        )
        state_dict = apply_reference_ema(state_dict, ema_state, layout_from_reference(config))
    return config, state_dict
