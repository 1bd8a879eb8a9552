"""Named transformer presets and a parameter / FLOPs counter.

A preset is a whole model config plus the latent shapes it is sized for:
- `tiny`: tests; well under a second per forward on a CPU.
- `toy`: the ShapesWorld demo, trained from scratch on a laptop, on the toy codecs' latents
  (image 4x8x8, text 8x32, audio 4x32x16).
- `sd3-medium`: the paper's size (SD3 medium's MMDiT plus an audio stream on AudioLDM2 latents).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from omniflow.init import initialize_weights
from omniflow.modality import Modality
from omniflow.transformer import OmniFlowTransformer


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict
    text_tokens: int

    def latent_shapes(self) -> dict[Modality, tuple[int, ...]]:
        """Per-sample latent shape of each stream (text at the width the text head predicts)."""
        c = self.config
        return {
            Modality.IMAGE: (c["in_channels"], c["sample_size"], c["sample_size"]),
            Modality.TEXT: (self.text_tokens, c["text_out_dim"]),
            Modality.AUDIO: (c["audio_in_channels"], *c["audio_sample_size"]),
        }


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="unit tests",
            text_tokens=4,
            config={
                "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "num_attention_heads": 2,
                "attention_head_dim": 8, "joint_attention_dim": 16, "text_out_dim": 16, "pooled_projection_dim": 16,
                "pos_embed_max_size": 16, "audio_in_channels": 4, "audio_sample_size": (16, 8), "audio_patch_size": 2,
                "audio_pos_embed_max_size": 16, "qk_norm": "layer_norm",
            },
        ),
        Preset(
            name="toy",
            description="ShapesWorld demo on a laptop",
            text_tokens=8,
            config={
                "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 6, "num_attention_heads": 4,
                "attention_head_dim": 32, "joint_attention_dim": 32, "text_out_dim": 32, "pooled_projection_dim": 64,
                "pos_embed_max_size": 16, "audio_in_channels": 4, "audio_sample_size": (32, 16), "audio_patch_size": 4,
                "audio_pos_embed_max_size": 16, "qk_norm": "layer_norm",
            },
        ),
        Preset(
            name="sd3-medium",
            description="the paper's size: SD3 medium + AudioLDM2-latent audio stream",
            text_tokens=32,
            config={
                "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "num_attention_heads": 24,
                "attention_head_dim": 64, "joint_attention_dim": 4096, "text_out_dim": 1536, "pooled_projection_dim": 2048,
                "pos_embed_max_size": 192, "audio_in_channels": 8, "audio_sample_size": (256, 16), "audio_patch_size": 2,
                "audio_pos_embed_max_size": 192, "qk_norm": None,
            },
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def build_transformer(preset: str, *, seed: int = 0, **overrides) -> OmniFlowTransformer:
    """A freshly initialised transformer from a named preset, with config overrides; a stream's
    initial weights depend only on `seed` and its layer names (`init.initialize_weights`).

    Example:
        >>> model = build_transformer("tiny", split_timestep_conditioning=True)
    """
    return initialize_weights(OmniFlowTransformer(**{**get_preset(preset).config, **overrides}), seed=seed)


@dataclass(frozen=True)
class ModelCost:
    """Parameters and matmul FLOPs per sample (multiply-add = 2 FLOPs)."""

    parameters: int
    parameters_by_stream: dict[str, int]
    forward_flops: int
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def train_flops(self) -> int:
        """Forward plus backward (twice the forward), the usual 3x estimate used for MFU."""
        return 3 * self.forward_flops


def _meta_model(config: Mapping) -> OmniFlowTransformer:
    with torch.device("meta"):
        return OmniFlowTransformer(**config)


def count_parameters(config: Mapping) -> tuple[int, dict[str, int]]:
    """Total parameters and those of each stream's block layers, without allocating weights."""
    model = _meta_model(config)
    by_stream: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            by_stream[parts[3]] = by_stream.get(parts[3], 0) + p.numel()
    return sum(p.numel() for p in model.parameters()), by_stream


def model_cost(config: Mapping, shapes: Mapping[str, Sequence[int]]) -> ModelCost:
    """Parameters and FLOPs per sample for a config and the per-sample latent shapes present.

    FLOPs count the matmuls, convolutions and attention products (what dominates and what
    `torch.utils.flop_counter` counts); norms, activations and the sinusoidal embedding are left out.

    Example:
        >>> p = get_preset("sd3-medium")
        >>> cost = model_cost(p.config, p.latent_shapes())
    """
    c = dict(_meta_model(config).config)
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    out_channels = c["out_channels"] or c["in_channels"]
    shapes = {Modality(m): tuple(s) for m, s in shapes.items()}
    tokens: dict[Modality, int] = {}
    flops = 0

    def linear(n: int, fan_in: int, fan_out: int) -> int:
        return 2 * n * fan_in * fan_out

    for m, shape in shapes.items():
        # timestep MLP (256 -> dim -> dim) and pooled MLP (pooled -> dim -> dim), once per sample
        flops += linear(1, 256, dim) + linear(1, dim, dim) + linear(1, c["pooled_projection_dim"], dim) + linear(1, dim, dim)
        if m == Modality.TEXT:
            tokens[m] = shape[0]
            j = c["joint_attention_dim"]
            flops += linear(tokens[m], j, dim)
            flops += linear(tokens[m], dim, j) + linear(1, dim, 2 * j) + linear(tokens[m], j, c["text_out_dim"])
        else:
            p = c["patch_size"] if m == Modality.IMAGE else c["audio_patch_size"]
            ch_out = out_channels if m == Modality.IMAGE else c["audio_in_channels"]
            tokens[m] = (shape[1] // p) * (shape[2] // p)
            flops += linear(tokens[m], shape[0] * p * p, dim)
            flops += linear(1, dim, 2 * dim) + linear(tokens[m], dim, p * p * ch_out)

    for i in range(c["num_layers"]):
        last = i == c["num_layers"] - 1
        queries = 0
        for m, n in tokens.items():
            if last and m == Modality.TEXT:
                flops += linear(1, dim, 2 * dim) + 2 * linear(n, dim, dim)
                continue
            queries += n
            flops += linear(1, dim, 6 * dim) + 4 * linear(n, dim, dim) + 2 * linear(n, dim, 4 * dim)
        keys = sum(tokens.values())
        flops += 4 * queries * keys * dim  # QK^T and attention-weighted V
    total, by_stream = count_parameters(c)
    return ModelCost(
        parameters=total,
        parameters_by_stream=by_stream,
        forward_flops=flops,
        tokens={m.value: n for m, n in tokens.items()},
    )

