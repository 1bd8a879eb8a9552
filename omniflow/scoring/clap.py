"""CLAP audio-text similarity with transformers' `ClapModel`.

`path` is a local model directory or a hub id (offline: from the local cache only) holding the
model, its feature extractor and its tokenizer (a `ClapProcessor` directory, e.g.
laion/clap-htsat-unfused). Audio is resampled to the extractor's rate (48 kHz) and cut to its
longest clip (`nb_max_samples`, 10 s) before feature extraction, so a long clip is scored on its
start deterministically rather than on the random crop the extractor would take.

    >>> clap = load_clap(ClapConfig(path="laion/clap-htsat-unfused"))
    >>> clap.similarity(clap.embed_audio([wav_bytes]), clap.embed_texts(["a dog barks"]))
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

from omniflow.codecs.base import DType, load_pretrained
from omniflow.codecs.media import decode_audio, resample

Clip = bytes | tuple[np.ndarray, int]  # encoded audio, or (mono waveform, sample rate)


class ClapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = "laion/clap-htsat-unfused"
    subfolder: str | None = None
    dtype: DType = "float32"


@dataclass(frozen=True)
class AudioFeatures:
    """What `ClapModel.get_audio_features` takes for a batch of clips."""

    input_features: torch.Tensor  # (B, 1 or 4, frames, mel bins)
    is_longer: torch.Tensor  # (B, 1) bool: used by fusion models only


def load_feature_extractor(config: ClapConfig) -> ClapFeatureExtractor:
    return load_pretrained(ClapFeatureExtractor.from_pretrained, config.path, subfolder=config.subfolder)


def audio_features(extractor: ClapFeatureExtractor, clips: Sequence[Clip]) -> AudioFeatures:
    """Decode (bytes raise `MediaError`), resample, cut to the extractor's longest clip, featurise."""
    rate, longest = extractor.sampling_rate, extractor.nb_max_samples
    waves = []
    for clip in clips:
        wave, sample_rate = decode_audio(clip) if isinstance(clip, bytes) else clip
        waves.append(resample(np.asarray(wave, dtype=np.float32), sample_rate, rate)[:longest])
    out = extractor(waves, sampling_rate=rate, return_tensors="pt")
    return AudioFeatures(input_features=out.input_features, is_longer=out.is_longer)


@dataclass
class Clap:
    """A loaded CLAP model with its feature extractor and tokenizer."""

    model: ClapModel
    extractor: ClapFeatureExtractor
    tokenizer: object
    device: torch.device

    def embed_features(self, features: AudioFeatures) -> torch.Tensor:
        """(B, D) float32 unit vectors (transformers returns the normalised projection as `pooler_output`)."""
        out = self.model.get_audio_features(
            input_features=features.input_features.to(self.device, self.model.dtype),
            is_longer=features.is_longer.to(self.device),
        )
        return out.pooler_output.float()

    def embed_audio(self, clips: Sequence[Clip]) -> torch.Tensor:
        return self.embed_features(audio_features(self.extractor, clips))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(**tokens).pooler_output.float()

    @staticmethod
    def similarity(audio_BD: torch.Tensor, texts_BD: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine similarity of paired unit embeddings: (B,)."""
        return (audio_BD * texts_BD).sum(dim=-1)


def load_clap(config: ClapConfig | dict, *, device: str | torch.device = "cpu") -> Clap:
    """Load model, feature extractor and tokenizer from `config.path` (errors name the path).

    Example:
        >>> clap = load_clap({"path": "models/clap-htsat-unfused"}, device="cuda")
        >>> clap.embed_texts(["a dog barks"]).shape
        torch.Size([1, 512])
    """
    config = ClapConfig.model_validate(config) if isinstance(config, dict) else config
    model = load_pretrained(
        ClapModel.from_pretrained, config.path, subfolder=config.subfolder, dtype=getattr(torch, config.dtype)
    )
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, config.path, subfolder=config.subfolder)
    return Clap(
        model=model.to(device).eval().requires_grad_(False), extractor=load_feature_extractor(config),
        tokenizer=tokenizer, device=torch.device(device),
    )
