"""Modality codecs (media <-> latents) and pooled-vector encoders, built from configs by kind."""

from omniflow.codecs.base import (
    Codec,
    CodecConfig,
    build_codec,
    codec_config,
    codec_kinds,
    load_pretrained,
    read_codec_set,
    register_codec,
)

__all__ = ["Codec", "CodecConfig", "build_codec", "codec_config", "codec_kinds", "load_pretrained", "read_codec_set",
           "register_codec"]
