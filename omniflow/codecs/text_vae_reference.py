"""Loading the OmniFlow release's text VAE into `TextVAE`.

Where the release keeps it: its text VAE is one module, a `LlamaForCausalLM` subclass that also
holds the Q-Former and the projections, attached to the transformer as `text_decoder`; its weights
therefore sit in the transformer checkpoint under `text_decoder.` (saved on their own they carry no
prefix). Its config (`text_vae/config.json`) is TinyLlama's `LlamaConfig` plus a `vae_config` dict:

    prompt_size      T5 width the Q-Former reads (1024)  -> Blip2QFormerConfig.encoder_hidden_size
    vae_dim          latent channels (1536)              -> latent_dim
    vae_hidden_size  Q-Former width                      -> Blip2QFormerConfig.hidden_size
    n_tokens         latent tokens, learned queries (32) -> num_queries
    pre_norm         normalise Q-Former output, not mean -> pre_norm
    norm_type        "layer_norm" (no affine), "rms_norm" -> norm_type
    vae_scale        latent multiplier (1.0)             -> latent_scale
    vae_dim != 1536  zero an empty caption's T5 features   -> zero_empty (the release's "legacy"
                     mode, 1536, does not)

The Q-Former is `Blip2QFormerConfig(hidden_size=vae_hidden_size, num_hidden_layers=6,
encoder_hidden_size=prompt_size)` with every other field at its default. The T5 encoder is the
public `google/flan-t5-large`, loaded on its own (a checkpoint saved after the encoder was attached
also carries it under `encoder.`); the release pads its input to 77 tokens without a mask. The
decoder tokenizer is TinyLlama's (BOS 1, EOS 2) with a `[PAD]` token added.

Key mapping, reference -> `TextVAE`, after the optional `text_decoder.` prefix is removed:

    model.*        -> decoder.model.*    the Llama body
    lm_head.*      -> decoder.lm_head.*
    query          -> query              (1, n_tokens, vae_hidden_size)
    qformer.*      -> qformer.*          Blip2QFormerModel (same names in transformers 4 and 5)
    vae_proj.*     -> vae_proj.*         vae_hidden_size -> 2 * vae_dim (mean, then log-variance)
    input_proj.*   -> input_proj.*       absent when the Llama is vae_dim wide (an identity)
    q_norm.weight  -> q_norm.weight      only with norm_type "rms_norm"
    encoder.*      -> encoder.*          T5EncoderModel, when present

Dropped: `*.rotary_emb.inv_freq`, a buffer that older transformers saved and that is recomputed
now. Any other key under the prefix is an error, so a renamed module cannot load silently.

Example:
    >>> _, state_dict = load_reference_dir("OmniFlow-v0.5")                       # doctest: +SKIP
    >>> vae = build_reference_text_vae(llama_config, encoder=t5, tokenizer_encoder=t5_tok,
    ...                                tokenizer_decoder=llama_tok)               # doctest: +SKIP
    >>> load_reference_weights(vae, state_dict)                                   # doctest: +SKIP
"""

from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

from omniflow.codecs.text_vae import TextVAE, TextVAEConfig
from omniflow.convert.reference import TEXT_DECODER_PREFIX
from omniflow.state_dicts import check_fits

REFERENCE_QFORMER_LAYERS = 6
REFERENCE_MAX_LENGTH = 77
LEGACY_LATENT_DIM = 1536  # the release's text VAE; narrower ones zero an empty caption's features
# (reference prefix, TextVAE prefix); checked in order, the first match wins.
KEY_RENAMES = (
    ("model.", "decoder.model."),
    ("lm_head.", "decoder.lm_head."),
    ("qformer.", "qformer."),
    ("vae_proj.", "vae_proj."),
    ("input_proj.", "input_proj."),
    ("q_norm.", "q_norm."),
    ("encoder.", "encoder."),
    ("query", "query"),
)
DROPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in renames:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return None


def map_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference text-VAE keys -> `TextVAE` keys (pure; the tensors are not copied).

    Takes a whole transformer checkpoint (only its `text_decoder.*` keys are used) or the text VAE's
    own state dict (no prefix). Raises `ValueError` naming any key it does not know.
    """
    if any(k.startswith(TEXT_DECODER_PREFIX) for k in state_dict):
        items = {
            k[len(TEXT_DECODER_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(TEXT_DECODER_PREFIX)
        }
    else:
        items = dict(state_dict)
    mapped, unknown = {}, []
    for key, value in items.items():
        if key.endswith(DROPPED_SUFFIXES):
            continue
        new = _rename(key, KEY_RENAMES)
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = value
    if unknown:
        raise ValueError(f"unknown reference text-VAE keys: {sorted(unknown)[:20]}")
    return mapped


def to_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = TEXT_DECODER_PREFIX
) -> dict[str, torch.Tensor]:
    """`TextVAE` keys -> reference keys under `prefix` (inverts `map_reference_state_dict`)."""
    inverse = tuple((new, old) for old, new in KEY_RENAMES)
    out = {}
    for key, value in state_dict.items():
        old = _rename(key, inverse)
        if old is None:
            raise ValueError(f"{key!r} is not a TextVAE key")
        out[prefix + old] = value
    return out


def text_vae_config_from_reference(vae_config: Mapping[str, Any]) -> TextVAEConfig:
    """A `TextVAEConfig` from the release's `vae_config` dict (see the module docstring)."""
    return TextVAEConfig(
        num_queries=vae_config["n_tokens"],
        latent_dim=vae_config["vae_dim"],
        max_length=REFERENCE_MAX_LENGTH,
        norm_type=vae_config["norm_type"],
        pre_norm=vae_config["pre_norm"],
        latent_scale=vae_config["vae_scale"],
        mask_padding=False,
        zero_empty=vae_config["vae_dim"] != LEGACY_LATENT_DIM,
    )


def reference_qformer_config(vae_config: Mapping[str, Any]) -> Blip2QFormerConfig:
    """The release's Q-Former: 6 layers of `vae_hidden_size`, reading `prompt_size` features."""
    return Blip2QFormerConfig(
        hidden_size=vae_config["vae_hidden_size"],
        num_hidden_layers=REFERENCE_QFORMER_LAYERS,
        encoder_hidden_size=vae_config["prompt_size"],
    )


def build_reference_text_vae(
    decoder_config: LlamaConfig,
    *,
    encoder: T5EncoderModel,
    tokenizer_encoder: PreTrainedTokenizerBase,
    tokenizer_decoder: PreTrainedTokenizerBase,
) -> TextVAE:
    """An uninitialised-weights `TextVAE` shaped like the release, from its `text_vae` config
    (a `LlamaConfig` with `vae_config`); fill it with `load_reference_weights`."""
    vae_config = getattr(decoder_config, "vae_config", None)
    if vae_config is None:
        raise ValueError(
            "decoder_config has no 'vae_config': is it the release's text_vae/config.json?"
        )
    return TextVAE(
        text_vae_config_from_reference(vae_config),
        encoder=encoder,
        qformer=Blip2QFormerModel(reference_qformer_config(vae_config)),
        decoder=LlamaForCausalLM(decoder_config),
        tokenizer_encoder=tokenizer_encoder,
        tokenizer_decoder=tokenizer_decoder,
    )


def load_reference_weights(model: TextVAE, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load release weights into `model`; returns the keys it left as they were.

    Every key except the T5 encoder's must be present with the model's shape; the encoder's are
    optional (the release loads Flan-T5 on its own), so only `encoder.*` keys can be returned.
    """
    mapped = map_reference_state_dict(state_dict)
    expected = model.state_dict()
    check_fits(mapped, expected, what="reference text VAE", required=lambda key: not key.startswith("encoder."))
    model.load_state_dict(mapped, strict=False)
    return sorted(set(expected) - set(mapped))
