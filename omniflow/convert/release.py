"""The released OmniFlow as a model directory that `AnyToAny` and the service load.

A release root (`jacklishufan/OmniFlow-v0.5`, `-v0.9`) holds:

    transformer/      config.json, diffusion_pytorch_model.bin (the text VAE rides in it under
                      text_decoder.*), ema_transformer.pt
    vae/              the image VAE (SD3's)
    text_encoder_2/   tokenizer_2/      CLIP-G, the second half of the text pooled vector
    text_vae/         config.json: the text VAE's Llama decoder with its `vae_config`
    vae_tokenizer/    the decoder's tokenizer (the pipeline adds a [PAD] token)
    scheduler/        flow matching with shift 3

Its pipeline loads four more public models by hub id; each may be given as a local directory:

    clip_l        laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K   text and image pooled vectors
    t5            google/flan-t5-large                       the text VAE's encoder
    audio         cvssp/audioldm2                            the audio VAE (vae/) and vocoder (vocoder/)
    languagebind  LanguageBind/LanguageBind_Audio_FT         the audio pooled vector

The model directory written (`omniflow.model_dir`):

    transformer/      converted (`omniflow.convert.reference`), raw or EMA weights
    image_codec/      the release's vae/, encoding conditions as the release does (PIL bilinear
                      resizing, z * scaling_factor)
    text_codec/       the text VAE in this project's layout (T5 encoder, Q-Former, decoder, tokenizers)
    audio_codec/      when `audio` is a local directory (a hub id stays a reference)
    text_pooled/      CLIP-L's and CLIP-G's text towers with their tokenizers (SD3's pooled layout)
    image_pooled/     CLIP-L's vision tower and image processor
    audio_pooled/     when `languagebind` is a local directory (a hub id stays a reference)
    omniflow.json     latent shapes, codec and pooled configs, "conventions": {"profile": "reference"}

Image and audio conditions use the posterior's mode, not a sample as the release does, so that equal
seeds give equal outputs (`sample_posterior: true` in a codec config samples).

    >>> release_model_dir("OmniFlow-v0.5", "models/omniflow-v0.5", ema=True)   # doctest: +SKIP
"""

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    T5EncoderModel,
)
from transformers.utils import logging as hf_logging

from omniflow.codecs.base import build_codec
from omniflow.codecs.text_vae_reference import build_reference_text_vae, load_reference_weights
from omniflow.convert.reference import TEXT_DECODER_PREFIX, convert_reference, load_reference_dir
from omniflow.model_dir import save_model_dir

CLIP_L = "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"
FLAN_T5 = "google/flan-t5-large"
AUDIOLDM2 = "cvssp/audioldm2"
LANGUAGEBIND_AUDIO = "LanguageBind/LanguageBind_Audio_FT"
DECODER_PAD_TOKEN = "[PAD]"


@dataclass
class ReleaseConversion:
    path: Path
    info: dict[str, Any]
    dropped_keys: list[str] = field(default_factory=list)
    fresh_keys: list[str] = field(default_factory=list)


def _text_codec(root: Path, state_dict: dict, t5: str, dest: Path) -> None:
    """The text VAE of the release, saved in this project's layout at `dest`."""
    decoder_tokenizer = AutoTokenizer.from_pretrained(root / "vae_tokenizer")
    decoder_tokenizer.add_special_tokens({"pad_token": DECODER_PAD_TOKEN})
    vae = build_reference_text_vae(
        LlamaConfig.from_pretrained(root / "text_vae"),
        encoder=T5EncoderModel.from_pretrained(t5),
        tokenizer_encoder=AutoTokenizer.from_pretrained(t5),
        tokenizer_decoder=decoder_tokenizer,
    )
    weights = {k.removeprefix(TEXT_DECODER_PREFIX): v for k, v in state_dict.items() if k.startswith(TEXT_DECODER_PREFIX)}
    if not weights:
        raise ValueError(f"{root}: the transformer checkpoint holds no {TEXT_DECODER_PREFIX}* weights (the text VAE)")
    load_reference_weights(vae, weights)
    vae.save_pretrained(dest)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Loading one tower of a whole CLIP checkpoint lists the other tower's weights as unused: expected here."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _text_pooled(root: Path, clip_l: str, dest: Path) -> None:
    """SD3's pooled layout: CLIP-L (text_encoder, tokenizer) and the release's CLIP-G (_2)."""
    CLIPTextModelWithProjection.from_pretrained(clip_l).save_pretrained(dest / "text_encoder")
    AutoTokenizer.from_pretrained(clip_l).save_pretrained(dest / "tokenizer")
    CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2").save_pretrained(dest / "text_encoder_2")
    AutoTokenizer.from_pretrained(root / "tokenizer_2").save_pretrained(dest / "tokenizer_2")


def _image_pooled(clip_l: str, dest: Path) -> None:
    CLIPVisionModelWithProjection.from_pretrained(clip_l).save_pretrained(dest)
    CLIPImageProcessor.from_pretrained(clip_l).save_pretrained(dest)


def release_model_dir(
    src: str | Path,
    out: str | Path,
    *,
    ema: bool = False,
    clip_l: str = CLIP_L,
    t5: str = FLAN_T5,
    audio: str = AUDIOLDM2,
    languagebind: str = LANGUAGEBIND_AUDIO,
    vocoder: str = "hifigan",
    resolution: int = 512,
    split_timestep_conditioning: bool = False,
    log: Callable[[str], None] = print,
) -> ReleaseConversion:
    """Convert a release root into the model directory `out` (layout in the module docstring)."""
    root = Path(src)
    for part in ("vae", "text_encoder_2", "tokenizer_2", "text_vae", "vae_tokenizer"):
        if not (root / part).is_dir():
            raise ValueError(f"{root} has no {part}/: not the root of an OmniFlow release")
    config, state_dict = load_reference_dir(root, ema=ema)
    conversion = convert_reference(config, state_dict, split_timestep_conditioning=split_timestep_conditioning)
    width = conversion.model.config.pooled_projection_dim
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".release-", dir=Path(out).parent) as tmp:  # beside `out`: room for it
        stage = Path(tmp)
        log("text VAE: the release's decoder, Q-Former and projections with the T5 encoder")
        _text_codec(root, state_dict, t5, stage / "text_codec")
        log(f"pooled encoders: CLIP-L ({clip_l}) and the release's CLIP-G")
        with _quiet():
            _text_pooled(root, clip_l, stage / "text_pooled")
            _image_pooled(clip_l, stage / "image_pooled")
        codecs = {
            "image": {"kind": "image-vae", "path": str(root), "subfolder": "vae", "resolution": resolution,
                      "shift_on_encode": False, "resize": "pil-bilinear"},
            "text": {"kind": "omniflow-text-vae", "path": str(stage / "text_codec")},
            "audio": {"kind": "audioldm2", "path": audio, "vocoder": vocoder, "shift_on_encode": False},
        }
        pooled = {
            "text": {"kind": "clip-text-pooled", "path": str(stage / "text_pooled"), "pooled_dim": width},
            "image": {"kind": "clip-image-pooled", "path": str(stage / "image_pooled"), "pooled_dim": width},
            "audio": {"kind": "languagebind-audio-pooled", "path": languagebind, "pooled_dim": width},
        }
        log("checking that every codec and pooled encoder loads")
        shapes = {m: list(build_codec(c).latent_shape) for m, c in codecs.items()}
        for config in pooled.values():
            build_codec(config)
        info = {"preset": None, "latent_shapes": shapes, "codecs": codecs, "pooled": pooled,
                "conventions": {"profile": "reference"},
                "source": {"release": root.name, "weights": "ema" if ema else "raw"}}
        path = save_model_dir(conversion.model, out, extra=info)
    return ReleaseConversion(path=Path(path), info=info, dropped_keys=conversion.dropped_keys,
                             fresh_keys=conversion.fresh_keys)
