"""OmniFlowTransformer: SD3's MMDiT with three token streams (image, text, audio) and joint attention.

Each block keeps one set of layers per stream (AdaLN-Zero modulation, q/k/v/out projections,
feed-forward) and runs a single attention over the concatenation of every present stream's
tokens. Any subset of the model's streams may be present in a call; an absent stream costs
nothing. As in SD3 the text stream of the last block is "pre-only": it lends keys and values to
the attention but is not updated, so the text head reads the stream as the block before left it.

Heads: image velocity, text x0 (as the OmniFlow reference) and audio velocity.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, RMSNorm
from einops import rearrange
from torch import nn

from omniflow.modality import MODALITIES, Modality

TIMESTEP_SCALE = 1000.0  # flow time t in [0, 1] is embedded on SD3's 0..1000 scale

# What each head predicts: the velocity noise - x0, or x0 itself (the reference's text head).
PREDICTION: dict[Modality, str] = {Modality.IMAGE: "velocity", Modality.TEXT: "x0", Modality.AUDIO: "velocity"}


def _qk_norm(kind: str | None, head_dim: int, eps: float) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=eps)
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps=eps)
    raise ValueError(f"qk_norm must be None, 'layer_norm' or 'rms_norm', got {kind!r}")


class StreamLayers(nn.Module):
    """One modality's layers inside a joint block.

    A pre-only stream (the text stream of the last block) only supplies keys and values: it has a
    continuous AdaLN instead of AdaLN-Zero and no query, output projection or feed-forward.
    Parallelism, compilation and activation checkpointing wrap these modules from outside.
    """

    def __init__(self, dim: int, head_dim: int, *, pre_only: bool, qk_norm: str | None, qk_norm_eps: float):
        super().__init__()
        self.pre_only = pre_only
        if pre_only:
            self.norm1 = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        else:
            self.norm1 = AdaLayerNormZero(dim)
            self.to_q = nn.Linear(dim, dim)
            self.norm_q = _qk_norm(qk_norm, head_dim, qk_norm_eps)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_k = _qk_norm(qk_norm, head_dim, qk_norm_eps)
        if not pre_only:
            self.to_out = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")


class JointBlock(nn.Module):
    """MMDiT block over any subset of its streams."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        streams: Sequence[str],
        *,
        text_pre_only: bool,
        qk_norm: str | None,
        qk_norm_eps: float,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.streams = nn.ModuleDict(
            {
                name: StreamLayers(
                    dim,
                    head_dim,
                    pre_only=text_pre_only and name == Modality.TEXT,
                    qk_norm=qk_norm,
                    qk_norm_eps=qk_norm_eps,
                )
                for name in streams
            }
        )

    def forward(self, x: dict[str, torch.Tensor], cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x: stream name -> tokens (B, L, D); cond: stream name -> conditioning vector (B, D)."""
        heads = lambda t: rearrange(t, "B L (H D) -> B H L D", H=self.num_heads)
        queries, keys, values, query_lengths, modulation = [], [], [], [], {}
        for name, x_BLD in x.items():
            layers = self.streams[name]
            if layers.pre_only:
                h_BLD = layers.norm1(x_BLD, cond[name])
            else:
                h_BLD, gate_msa, shift_mlp, scale_mlp, gate_mlp = layers.norm1(x_BLD, emb=cond[name])
                modulation[name] = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
                queries.append(layers.norm_q(heads(layers.to_q(h_BLD))))
                query_lengths.append(x_BLD.shape[1])
            keys.append(layers.norm_k(heads(layers.to_k(h_BLD))))
            values.append(heads(layers.to_v(h_BLD)))

        out = {name: x_BLD for name, x_BLD in x.items() if name not in modulation}
        if not queries:
            return out
        attn_BHLD = F.scaled_dot_product_attention(
            torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2)
        )
        attn_BLD = rearrange(attn_BHLD, "B H L D -> B L (H D)")
        for name, a_BLD in zip(modulation, attn_BLD.split(query_lengths, dim=1)):
            layers, x_BLD = self.streams[name], x[name]
            gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation[name]
            x_BLD = x_BLD + gate_msa[:, None] * layers.to_out(a_BLD)
            h_BLD = layers.norm2(x_BLD) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            out[name] = x_BLD + gate_mlp[:, None] * layers.ff(h_BLD)
        return out


class OmniFlowTransformer(ModelMixin, ConfigMixin):
    """Multi-modal MMDiT predicting image velocity, text x0 and audio velocity.

    Args:
        sample_size: image latent height/width the model was built for.
        patch_size: image patch size.
        in_channels / out_channels: image latent channels (out defaults to in).
        num_layers, num_attention_heads, attention_head_dim: transformer size.
        joint_attention_dim: width of text latents entering the text stream (narrower latents are
            zero-padded, as the reference pads its text-VAE latents).
        text_out_dim: width of the text head's x0 prediction.
        pooled_projection_dim: width of the pooled conditioning vector.
        pos_embed_max_size: side of the image positional-embedding grid (cropped per input size).
        audio_in_channels, audio_sample_size, audio_patch_size, audio_pos_embed_max_size: the same
            for audio latents (AudioLDM2's VAE gives 8 x 256 x 16).
        streams: which of "image", "text", "audio" the model has.
        qk_norm: None, "layer_norm" or "rms_norm", per head, applied to each stream's q and k.
        split_timestep_conditioning: False sums the timestep embeddings of all present modalities
            into one vector that modulates every stream; True modulates each stream with its own.

    Example:
        >>> model = OmniFlowTransformer(num_layers=2, num_attention_heads=2, attention_head_dim=8,
        ...     in_channels=4, sample_size=8, joint_attention_dim=16, text_out_dim=16,
        ...     pooled_projection_dim=8, audio_in_channels=4, audio_sample_size=(8, 4))
        >>> latents = {"image": torch.randn(1, 4, 8, 8), "text": torch.randn(1, 5, 16)}
        >>> t = {"image": torch.tensor([0.7]), "text": torch.tensor([0.0])}
        >>> model(latents, t)["image"].shape
        torch.Size([1, 4, 8, 8])
    """

    _no_split_modules = ["JointBlock"]  # noqa: RUF012 (diffusers reads this class attribute)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        num_layers: int = 24,
        num_attention_heads: int = 24,
        attention_head_dim: int = 64,
        joint_attention_dim: int = 4096,
        text_out_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        audio_in_channels: int = 8,
        audio_sample_size: tuple[int, int] = (256, 16),
        audio_patch_size: int = 2,
        audio_pos_embed_max_size: int = 192,
        streams: tuple[str, ...] = ("image", "text", "audio"),
        qk_norm: str | None = None,
        qk_norm_eps: float = 1e-6,
        split_timestep_conditioning: bool = False,
    ):
        super().__init__()
        unknown = set(streams) - set(MODALITIES)
        if not streams or unknown:
            raise ValueError(f"streams must be a non-empty subset of {list(MODALITIES)}, got {list(streams)}")
        self.streams = tuple(m for m in MODALITIES if m in streams)
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels

        self.time_embed = nn.ModuleDict(
            {m: CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim) for m in self.streams}
        )
        if Modality.IMAGE in self.streams:
            self.image_embed = PatchEmbed(
                height=sample_size,
                width=sample_size,
                patch_size=patch_size,
                in_channels=in_channels,
                embed_dim=dim,
                pos_embed_max_size=pos_embed_max_size,
            )
            self.image_norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
            self.image_proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        if Modality.TEXT in self.streams:
            self.text_embed = nn.Linear(joint_attention_dim, dim)
            self.text_proj = nn.Linear(dim, joint_attention_dim)
            self.text_norm_out = AdaLayerNormContinuous(
                joint_attention_dim, dim, elementwise_affine=False, eps=1e-6
            )
            self.text_proj_out = nn.Linear(joint_attention_dim, text_out_dim)
        if Modality.AUDIO in self.streams:
            self.audio_embed = PatchEmbed(
                height=audio_sample_size[0],
                width=audio_sample_size[1],
                patch_size=audio_patch_size,
                in_channels=audio_in_channels,
                embed_dim=dim,
                pos_embed_max_size=audio_pos_embed_max_size,
            )
            self.audio_norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
            self.audio_proj_out = nn.Linear(dim, audio_patch_size * audio_patch_size * audio_in_channels)

        self.blocks = nn.ModuleList(
            [
                JointBlock(
                    dim,
                    num_attention_heads,
                    attention_head_dim,
                    self.streams,
                    text_pre_only=i == num_layers - 1,
                    qk_norm=qk_norm,
                    qk_norm_eps=qk_norm_eps,
                )
                for i in range(num_layers)
            ]
        )

    def forward(
        self,
        latents: Mapping[str, torch.Tensor],
        timesteps: Mapping[str, torch.Tensor],
        pooled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict each present modality's output.

        Args:
            latents: modality -> latents. image (B, C, H, W); text (B, L, D <= joint_attention_dim);
                audio (B, C_a, H_a, W_a). Absent modalities are skipped.
            timesteps: modality -> flow time t in [0, 1] of shape (B,), for every present modality
                (0 = clean, 1 = pure noise).
            pooled: (B, pooled_projection_dim) conditioning vector; zeros when None.

        Returns:
            modality -> prediction: image and audio velocity (shape of the input), text x0
            (B, L, text_out_dim).
        """
        present = [m for m in self.streams if m in latents]
        extra = set(latents) - set(self.streams)
        if extra:
            raise ValueError(f"model has streams {list(self.streams)}; got latents for {sorted(extra)}")
        if not present:
            raise ValueError("at least one modality's latents are required")
        missing_t = [m for m in present if m not in timesteps]
        if missing_t:
            raise ValueError(f"timesteps missing for {missing_t}")

        batch = latents[present[0]].shape[0]
        ref = latents[present[0]]
        if pooled is None:
            pooled = ref.new_zeros(batch, self.config.pooled_projection_dim)
        cond = {m: self.time_embed[m](timesteps[m] * TIMESTEP_SCALE, pooled) for m in present}
        if not self.config.split_timestep_conditioning:
            joint = sum(cond.values())
            cond = {m: joint for m in present}

        x = {m: self._embed(m, latents[m]) for m in present}
        for block in self.blocks:
            x = block(x, cond)
        return {m: self._head(m, x[m], cond[m], latents[m].shape) for m in present}

    def _embed(self, modality: str, latents: torch.Tensor) -> torch.Tensor:
        if modality == Modality.IMAGE:
            return self.image_embed(latents)
        if modality == Modality.AUDIO:
            return self.audio_embed(latents)
        width = self.config.joint_attention_dim
        if latents.shape[-1] > width:
            raise ValueError(f"text latents are {latents.shape[-1]} wide; the model takes at most {width}")
        return self.text_embed(F.pad(latents, (0, width - latents.shape[-1])))

    def _head(self, modality: str, x_BLD: torch.Tensor, cond: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if modality == Modality.TEXT:
            h = self.text_norm_out(self.text_proj(x_BLD), cond)
            return self.text_proj_out(h)
        if modality == Modality.IMAGE:
            h, p = self.image_proj_out(self.image_norm_out(x_BLD, cond)), self.config.patch_size
        else:
            h, p = self.audio_proj_out(self.audio_norm_out(x_BLD, cond)), self.config.audio_patch_size
        return rearrange(h, "B (H W) (p q C) -> B C (H p) (W q)", H=shape[-2] // p, W=shape[-1] // p, p=p, q=p)
