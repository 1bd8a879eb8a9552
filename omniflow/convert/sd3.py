"""Start an `OmniFlowTransformer` from a Stable Diffusion 3 transformer (`SD3Transformer2DModel`).

This is how OmniFlow itself was built: SD3's MMDiT already has an image and a text stream, so its
weights fill those, and the streams SD3 lacks (the text head, the audio stream) start fresh. The
text and audio timestep embedders are zeroed, so in joint conditioning the converted model computes
exactly SD3's image prediction whenever audio is absent, and training moves on from there.

Example:
    >>> model = transformer_from_sd3("stabilityai/stable-diffusion-3-medium-diffusers",
    ...     audio_init="image")  # doctest: +SKIP
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import huggingface_hub.constants
import torch
from diffusers import SD3Transformer2DModel

from omniflow.init import initialize_weights, zero_timestep_embedder
from omniflow.modality import Modality
from omniflow.state_dicts import check_fits
from omniflow.transformer import OmniFlowTransformer

SD3_SUBFOLDER = "transformer"  # where a diffusers SD3 pipeline keeps its transformer
SUPPORTED_QK_NORMS = (None, "layer_norm", "rms_norm")

SD3_TOP_LEVEL_RENAMES = (
    ("pos_embed.", "image_embed."),
    ("time_text_embed.", "time_embed.image."),  # SD3's only timestep embedder: the image's
    ("context_embedder.", "text_embed."),
    ("norm_out.", "image_norm_out."),
    ("proj_out.", "image_proj_out."),
)
SD3_BLOCK_RENAMES = (  # SD3 suffix inside a block -> (our stream, our suffix)
    ("norm1.", Modality.IMAGE, "norm1."),
    ("attn.to_q.", Modality.IMAGE, "to_q."),
    ("attn.to_k.", Modality.IMAGE, "to_k."),
    ("attn.to_v.", Modality.IMAGE, "to_v."),
    ("attn.norm_q.", Modality.IMAGE, "norm_q."),
    ("attn.norm_k.", Modality.IMAGE, "norm_k."),
    ("attn.to_out.0.", Modality.IMAGE, "to_out."),
    ("ff.", Modality.IMAGE, "ff."),
    ("norm1_context.", Modality.TEXT, "norm1."),
    ("attn.add_q_proj.", Modality.TEXT, "to_q."),
    ("attn.add_k_proj.", Modality.TEXT, "to_k."),
    ("attn.add_v_proj.", Modality.TEXT, "to_v."),
    ("attn.norm_added_q.", Modality.TEXT, "norm_q."),
    ("attn.norm_added_k.", Modality.TEXT, "norm_k."),
    ("attn.to_add_out.", Modality.TEXT, "to_out."),
    ("ff_context.", Modality.TEXT, "ff."),
)
# SD3's last block still computes text queries, then discards them with the text stream.
SD3_LAST_BLOCK_UNUSED = ("attn.add_q_proj.", "attn.norm_added_q.")


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in {"1", "ON", "YES", "TRUE"} or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else can only be meant as a local path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or os.sep in source.replace("/", "")
    )


def load_sd3(source: str | Path, *, subfolder: str | None = None) -> SD3Transformer2DModel:
    """Load an SD3 transformer from a transformer dir, a pipeline root, or a hub id.

    A local directory holding `config.json` is a transformer dir; one holding
    `transformer/config.json` is a pipeline root. Hub ids default to the `transformer` subfolder
    and are refused while HF_HUB_OFFLINE is set.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if subfolder is None:
            subfolder = None if (path / "config.json").is_file() else SD3_SUBFOLDER
        if not (path / (subfolder or "") / "config.json").is_file():
            raise ValueError(
                f"{path / (subfolder or '')} has no config.json: not an SD3 transformer or pipeline"
            )
        return SD3Transformer2DModel.from_pretrained(path, subfolder=subfolder)
    if path.exists() or _looks_like_local_path(str(source)):
        raise ValueError(f"SD3 checkpoint path {source} does not exist or is not a directory")
    if _hub_offline():
        raise ValueError(
            f"{source} is not a local directory, and HF_HUB_OFFLINE is set: cannot download it"
        )
    try:
        return SD3Transformer2DModel.from_pretrained(
            str(source), subfolder=subfolder or SD3_SUBFOLDER
        )
    except OSError as err:
        raise ValueError(f"could not load an SD3 transformer from {source}: {err}") from err


def _our_key(key: str) -> str | None:
    for sd3_prefix, our_prefix in SD3_TOP_LEVEL_RENAMES:
        if key.startswith(sd3_prefix):
            return our_prefix + key[len(sd3_prefix) :]
    head, _, rest = key.partition(".")
    index, _, rest = rest.partition(".")
    if head != "transformer_blocks" or not index.isdigit():
        return None
    for sd3_suffix, stream, our_suffix in SD3_BLOCK_RENAMES:
        if rest.startswith(sd3_suffix):
            return f"blocks.{index}.streams.{stream}.{our_suffix}{rest[len(sd3_suffix) :]}"
    return None


def state_dict_from_sd3(
    sd3_sd: Mapping[str, torch.Tensor], num_layers: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an SD3 transformer state dict onto our image and text streams.

    Returns (our partial state dict, dropped SD3 keys: the last block's unused text queries).
    Raises ValueError naming any SD3 key that has no place in our layout.
    """
    last = f"transformer_blocks.{num_layers - 1}."
    ours: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    for key, tensor in sd3_sd.items():
        if key.startswith(last) and key[len(last) :].startswith(SD3_LAST_BLOCK_UNUSED):
            dropped.append(key)
        elif (our_key := _our_key(key)) is None:
            unexpected.append(key)
        else:
            ours[our_key] = tensor
    if unexpected:
        raise ValueError(f"SD3 keys with no counterpart in OmniFlowTransformer: {unexpected}")
    return ours, dropped


def check_mmdit_config(config: Mapping[str, Any]) -> None:
    """Reject SD3-family settings that OmniFlowTransformer cannot represent.

    Shared by both converters: the OmniFlow reference is SD3's transformer extended.
    """
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    if config["caption_projection_dim"] != inner_dim:
        raise ValueError(
            f"caption_projection_dim={config['caption_projection_dim']} must equal "
            f"num_attention_heads x attention_head_dim = {inner_dim}: the blocks run at that width"
        )
    if config.get("dual_attention_layers"):
        raise ValueError(
            f"dual_attention_layers={list(config['dual_attention_layers'])}: SD3.5's dual "
            "attention has no counterpart in OmniFlowTransformer"
        )
    if config.get("qk_norm") not in SUPPORTED_QK_NORMS:
        raise ValueError(
            f"qk_norm={config['qk_norm']!r} is not supported; expected one of {SUPPORTED_QK_NORMS}"
        )


def _config_from_sd3(
    sd3_config: Mapping,
    *,
    streams: Sequence[str],
    text_out_dim: int | None,
    audio_in_channels: int,
    audio_sample_size: tuple[int, int],
    split_timestep_conditioning: bool,
) -> dict:
    check_mmdit_config(sd3_config)
    if Modality.IMAGE not in streams or Modality.TEXT not in streams:
        raise ValueError(
            f"streams must include 'image' and 'text' (SD3's two streams), got {list(streams)}"
        )
    return {
        "sample_size": sd3_config["sample_size"],
        "patch_size": sd3_config["patch_size"],
        "in_channels": sd3_config["in_channels"],
        "out_channels": sd3_config.get("out_channels") or sd3_config["in_channels"],
        "num_layers": sd3_config["num_layers"],
        "num_attention_heads": sd3_config["num_attention_heads"],
        "attention_head_dim": sd3_config["attention_head_dim"],
        "joint_attention_dim": sd3_config["joint_attention_dim"],
        "text_out_dim": text_out_dim or sd3_config["joint_attention_dim"],
        "pooled_projection_dim": sd3_config["pooled_projection_dim"],
        "pos_embed_max_size": sd3_config["pos_embed_max_size"],
        "audio_in_channels": audio_in_channels,
        "audio_sample_size": tuple(audio_sample_size),
        "streams": tuple(streams),
        "qk_norm": sd3_config.get("qk_norm"),
        "qk_norm_eps": 1e-6,  # SD3's joint attention uses eps=1e-6
        "split_timestep_conditioning": split_timestep_conditioning,
    }


def _covered_by_sd3(key: str) -> bool:
    """Whether SD3 supplies our parameter: image stream and head, text stream in the blocks."""
    return key.startswith(("image_", "time_embed.image.", "text_embed.")) or any(
        f".streams.{s}." in key for s in (Modality.IMAGE, Modality.TEXT)
    )


def _seed_audio_from_image(state: dict[str, torch.Tensor]) -> None:
    """Copy every block's image-stream layers and the image head norm into the audio stream.

    The audio patch embedding and output projection stay fresh: their channel counts differ.
    """
    for key in [k for k in state if ".streams.image." in k or k.startswith("image_norm_out.")]:
        audio_key = key.replace(".streams.image.", ".streams.audio.").replace(
            "image_norm_out.", "audio_norm_out."
        )
        state[audio_key] = state[key]  # load_state_dict copies, so the streams stay separate


def transformer_from_sd3(
    sd3: str | Path | SD3Transformer2DModel,
    *,
    audio_init: Literal["fresh", "image"] = "fresh",
    streams: Sequence[str] = ("image", "text", "audio"),
    text_out_dim: int | None = None,
    audio_in_channels: int = 8,
    audio_sample_size: tuple[int, int] = (256, 16),
    split_timestep_conditioning: bool = False,
    subfolder: str | None = None,
) -> OmniFlowTransformer:
    """`OmniFlowTransformer` whose image and text streams are SD3's; the rest initialised fresh.

    Args:
        sd3: a loaded `SD3Transformer2DModel`, a local transformer dir or pipeline root, or a
            hub id.
        audio_init: "fresh" initialises the audio stream DiT-style; "image" seeds each block's audio
            layers (and the audio head norm) with copies of its image layers.
        streams: our model's streams; must include "image" and "text".
        text_out_dim: width of the text head's x0 prediction (default: joint_attention_dim).
        audio_in_channels, audio_sample_size: audio latent shape (AudioLDM2's VAE: 8 x 256 x 16).
        split_timestep_conditioning: see `OmniFlowTransformer`; SD3's function is reproduced in
            joint conditioning.
        subfolder: the transformer's subfolder, for a pipeline root or a hub id.

    Example:
        >>> model = transformer_from_sd3("sd3-pipeline", audio_init="image")  # doctest: +SKIP
    """
    if audio_init not in ("fresh", "image"):
        raise ValueError(f"audio_init must be 'fresh' or 'image', got {audio_init!r}")
    if audio_init == "image" and Modality.AUDIO not in streams:
        raise ValueError("audio_init='image' needs an audio stream in `streams`")
    if not isinstance(sd3, SD3Transformer2DModel):
        sd3 = load_sd3(sd3, subfolder=subfolder)
    config = _config_from_sd3(
        sd3.config,
        streams=streams,
        text_out_dim=text_out_dim,
        audio_in_channels=audio_in_channels,
        audio_sample_size=audio_sample_size,
        split_timestep_conditioning=split_timestep_conditioning,
    )
    model = initialize_weights(OmniFlowTransformer(**config))
    ours, _ = state_dict_from_sd3(sd3.state_dict(), config["num_layers"])
    state = model.state_dict()
    check_fits(ours, state, what="SD3 checkpoint", required=_covered_by_sd3)
    state |= ours
    if audio_init == "image":
        _seed_audio_from_image(state)
    model.load_state_dict(state, strict=True)
    for modality in (Modality.TEXT, Modality.AUDIO):
        if modality in model.time_embed:
            zero_timestep_embedder(model.time_embed[modality])
    return model
