"""Weight initialisation for training from scratch and for grafting new streams onto a checkpoint.

DiT's recipe: Xavier-uniform linears with zero bias, zeroed AdaLN modulation (so every residual
branch starts as the identity) and zeroed output projections.
"""

import torch
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from torch import nn

from omniflow.transformer import OmniFlowTransformer


@torch.no_grad()
def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.zero_()
    return module


@torch.no_grad()
def zero_timestep_embedder(embedder: CombinedTimestepTextProjEmbeddings) -> None:
    """Make an embedder output zeros for any input while staying trainable.

    Used when a modality is added to a checkpoint: summed into the joint conditioning vector, a
    zero embedding leaves the checkpoint's function unchanged until training moves it.
    """
    zero_module(embedder.timestep_embedder.linear_2)
    zero_module(embedder.text_embedder.linear_2)


@torch.no_grad()
def initialize_weights(model: OmniFlowTransformer) -> OmniFlowTransformer:
    """Initialise every parameter of `model` in place (DiT-style) and return it."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for embed in model.time_embed.values():
        nn.init.normal_(embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embed.timestep_embedder.linear_2.weight, std=0.02)
    for module in model.modules():
        if isinstance(module, (AdaLayerNormZero, AdaLayerNormContinuous)):
            zero_module(module.linear)
    for name in ("image_proj_out", "text_proj_out", "audio_proj_out"):
        if hasattr(model, name):
            zero_module(getattr(model, name))
    return model
