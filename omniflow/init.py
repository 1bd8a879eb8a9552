"""Weight initialisation for training from scratch and for grafting new streams onto a checkpoint.

DiT's recipe: Xavier-uniform linears (and patch-embedding convolutions) with zero bias, zeroed
AdaLN modulation (so every residual branch starts as the identity) and zeroed output projections.

Each layer draws from its own generator, seeded by (seed, layer name): a stream starts with the
same weights whichever other streams the model has. The staged recipe relies on it: the stage-1
(image, text) and stage-2 (text, audio) models start from one text stream, so averaging their
text streams at the merge averages weights that began together (in the paper both start from
SD3's text branch); with draws in module order the two text streams would start unrelated.
"""

import hashlib

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


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator for the layer called `name`, the same in every model built with `seed`."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def initialize_weights(model: OmniFlowTransformer, *, seed: int = 0) -> OmniFlowTransformer:
    """Initialise every parameter of `model` in place (DiT-style) and return it.

    Deterministic per (seed, layer name), independent of the global RNG and of the other layers.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight
            init = torch.empty(weight.shape[0], weight[0].numel())  # a conv as the linear it is per patch
            nn.init.xavier_uniform_(init, generator=layer_generator(seed, name))
            weight.copy_(init.view_as(weight))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for m, embed in model.time_embed.items():
        for sub in ("linear_1", "linear_2"):
            layer = getattr(embed.timestep_embedder, sub)
            nn.init.normal_(layer.weight, std=0.02, generator=layer_generator(seed, f"time_embed.{m}.timestep_embedder.{sub}"))
    for module in model.modules():
        if isinstance(module, (AdaLayerNormZero, AdaLayerNormContinuous)):
            zero_module(module.linear)
    for name in ("image_proj_out", "text_proj_out", "audio_proj_out"):
        if hasattr(model, name):
            zero_module(getattr(model, name))
    return model
