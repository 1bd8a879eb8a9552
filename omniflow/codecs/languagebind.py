"""LanguageBind's audio tower (`LanguageBind/LanguageBind_Audio_FT`): the released OmniFlow's pooled
encoder for audio, as the kind `languagebind-audio-pooled`.

Front end (`FbankFrontEnd`, what LanguageBind's audio processor computes), in torch ops:
1. The waveform at 16 kHz (LanguageBind reads a file's first channel, this project's decoding
   mixes the channels down; resampling is this project's `media.resample`). A clip of at most
   `target_length` x 10 ms (1036 frames: 165,760 samples) is repeated a whole number of times and
   zero-padded to exactly that length; the waveform's mean is subtracted.
2. Kaldi filterbanks (torchaudio's `compliance.kaldi.fbank` with LanguageBind's settings): 25 ms
   frames (400 samples) every 10 ms (160), no dither, each frame's mean removed, pre-emphasis 0.97,
   a symmetric Hann window, zero-padded to a 512-point FFT, power spectrum, 112 triangular filters
   from 20 Hz to 8 kHz on the mel scale 1127 ln(1 + f / 700), log(max(energy, float32 eps)).
   165,760 samples give 1034 frames.
3. Three copies of the frames as three channels; a longer clip gives three 1036-frame windows of
   its whole fbank instead, starting where the first, second and last third of the possible
   starts begin. Zero-padded (in the log domain) to 1036 frames, turned to (3, 112, 1036),
   standardised with mean -4.2677393 and std 4.5689974 (all read from the checkpoint's config).

Tower (`LanguageBindAudioTower`): CLIP's ViT, transformers' `CLIPVisionModelWithProjection`, with a
rectangular input grid. A 112 x 1036 input in patches of 14 is 8 x 74 = 592 patches plus the class
token; the checkpoint stores those 593 position embeddings as they are (LanguageBind's model
resizes CLIP's square grid when it is built, before its weights load), so nothing is interpolated
when it runs. The checkpoint's `vision_model.*` and `visual_projection.weight` keep their names;
its text tower (`text_model.*`, `text_projection.weight`, `logit_scale`) is not read. The config
is the checkpoint's `vision_config` with the top level's `projection_dim`. Patch dropout, which
LanguageBind applies only in training, is absent. The embedding is the projection's output, not normalised, as the
released pipeline takes it (`get_image_features`), written into the first dimensions of the pooled
vector; its null input is all-zero pixel values.

Example:
    >>> from omniflow.codecs import build_codec
    >>> audio = build_codec({"kind": "languagebind-audio-pooled",
    ...                      "path": "LanguageBind/LanguageBind_Audio_FT"})
    >>> audio.embed([wav_bytes])  # (1, 2048): the embedding, then zeros
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, PretrainedConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from omniflow.codecs.base import register_codec
from omniflow.codecs.media import check_audio
from omniflow.codecs.pooled import PooledConfig, PooledEncoder, pad_pooled, waves_at
from omniflow.modality import Modality

FRAME_MS, SHIFT_MS = 25, 10
PREEMPHASIS = 0.97
LOW_HZ = 20.0
FRONT_END_FIELDS = ("audio_sample_rate", "num_mel_bins", "target_length", "audio_mean", "audio_std")


def kaldi_mel_banks(num_mel_bins: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """(num_mel_bins, n_fft // 2 + 1) triangular filters, 20 Hz to Nyquist, equally spaced on
    Kaldi's mel scale; float32 throughout as torchaudio computes them. The Nyquist bin gets none."""
    low, high = (1127.0 * math.log(1.0 + hz / 700.0) for hz in (LOW_HZ, 0.5 * sample_rate))
    delta = (high - low) / (num_mel_bins + 1)
    bin_M1 = torch.arange(num_mel_bins).unsqueeze(1)
    left_M1, center_M1, right_M1 = (low + (bin_M1 + k) * delta for k in range(3))
    hz_1F = sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32).unsqueeze(0)
    mel_1F = 1127.0 * (1.0 + hz_1F / 700.0).log()
    up_MF = (mel_1F - left_M1) / (center_M1 - left_M1)
    down_MF = (right_M1 - mel_1F) / (right_M1 - center_M1)
    banks_MF = torch.clamp(torch.minimum(up_MF, down_MF), min=0.0)
    return nn.functional.pad(banks_MF, (0, 1))


def kaldi_fbank(wave_N: torch.Tensor, *, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """A float32 waveform (N,) -> log filterbank energies (T, num_mel_bins), T = 1 + (N - 400) //
    160 at 16 kHz (frames that would run past the end are dropped, Kaldi's `snip_edges`)."""
    window = int(sample_rate * FRAME_MS / 1000)
    shift = int(sample_rate * SHIFT_MS / 1000)
    n_fft = 1 << (window - 1).bit_length()
    frames_TW = wave_N.unfold(0, window, shift)
    frames_TW = frames_TW - frames_TW.mean(dim=1, keepdim=True)
    previous_TW = torch.cat([frames_TW[:, :1], frames_TW[:, :-1]], dim=1)
    frames_TW = (frames_TW - PREEMPHASIS * previous_TW) * torch.hann_window(
        window, periodic=False, dtype=frames_TW.dtype
    )
    power_TF = torch.fft.rfft(frames_TW, n=n_fft).abs().pow(2.0)
    energies_TM = torch.mm(power_TF, kaldi_mel_banks(num_mel_bins, n_fft, sample_rate).T)
    return torch.clamp(energies_TM, min=torch.finfo(torch.float32).eps).log()


def chunk_starts(num_frames: int, length: int) -> tuple[int, int, int]:
    """Where a longer clip's three windows of `length` frames start: the first start of each of
    three near-equal parts of the possible starts (numpy's `array_split`), 0 for an empty part."""
    starts = num_frames - length + 1
    base, extra = divmod(max(starts, 0), 3)
    return tuple(k * base + min(k, extra) if base + (k < extra) else 0 for k in range(3))


@dataclass(frozen=True)
class FbankFrontEnd:
    """Waveforms -> the tower's (B, 3, num_mel_bins, target_length) input; see the module's
    docstring for the steps."""

    sample_rate: int = 16_000
    num_mel_bins: int = 112
    target_length: int = 1036
    mean: float = -4.2677393
    std: float = 4.5689974

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "FbankFrontEnd":
        """The settings a LanguageBind audio `vision_config` holds."""
        return cls(sample_rate=config.audio_sample_rate, num_mel_bins=config.num_mel_bins,
                   target_length=config.target_length, mean=config.audio_mean,
                   std=config.audio_std)

    @property
    def num_samples(self) -> int:
        """Samples that make `target_length` 10 ms frames."""
        return self.target_length * self.sample_rate // 100

    def __call__(self, waves: Sequence[np.ndarray]) -> torch.Tensor:
        """Mono waveforms at `sample_rate` -> standardised pixel values (B, 3, M, T)."""
        return torch.stack([self._one(torch.as_tensor(w, dtype=torch.float32)) for w in waves])

    def _one(self, wave_N: torch.Tensor) -> torch.Tensor:
        longer = len(wave_N) > self.num_samples
        if not longer:
            wave_N = wave_N.repeat(self.num_samples // len(wave_N))
            wave_N = nn.functional.pad(wave_N, (0, self.num_samples - len(wave_N)))
        fbank_TM = kaldi_fbank(wave_N - wave_N.mean(), sample_rate=self.sample_rate,
                               num_mel_bins=self.num_mel_bins)
        # The release fails on a clip just over 10.36 s (fewer frames than one window); its windows
        # then start at 0 here.
        starts = chunk_starts(len(fbank_TM), self.target_length) if longer else (0, 0, 0)
        chunks_3TM = torch.stack([fbank_TM[s : s + self.target_length] for s in starts])
        missing = self.target_length - chunks_3TM.shape[1]
        chunks_3TM = nn.functional.pad(chunks_3TM, (0, 0, 0, missing))
        return (chunks_3TM.transpose(1, 2) - self.mean) / self.std


class GridEmbeddings(CLIPVisionEmbeddings):
    """CLIP's patch, class and position embeddings over a (num_mel_bins x target_length) input:
    one learned position per patch of the rectangular grid, row-major, after the class token's."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.input_size = (config.num_mel_bins, config.target_length)
        rows, columns = (side // self.patch_size for side in self.input_size)
        self.num_patches = rows * columns
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        positions = torch.arange(self.num_positions).expand((1, -1))
        self.position_ids = nn.Buffer(positions, persistent=False)

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        size = tuple(pixel_values.shape[-2:])
        if size != self.input_size:
            raise ValueError(f"pixel values are {size}, the tower takes {self.input_size}")
        patches_BDhw = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        class_B1D = self.class_embedding.expand(pixel_values.shape[0], 1, -1)
        tokens_BLD = torch.cat([class_B1D, patches_BDhw.flatten(2).transpose(1, 2)], dim=1)
        return tokens_BLD + self.position_embedding(self.position_ids)


def tower_config(raw: dict) -> CLIPVisionConfig:
    """A LanguageBind audio config.json (as a dict) -> the tower's config: its `vision_config`
    (which keeps the front end's settings) with the top level's `projection_dim`."""
    vision = raw.get("vision_config", {})
    missing = [name for name in FRONT_END_FIELDS if name not in vision]
    if missing:
        raise ValueError(f"config.json's vision_config lacks {missing}: not a LanguageBind audio model")
    return CLIPVisionConfig(**{**vision, "projection_dim": raw["projection_dim"]})


class LanguageBindAudioTower(CLIPVisionModelWithProjection):
    """LanguageBind's audio tower: `CLIPVisionModelWithProjection` with `GridEmbeddings`. Loads
    from a LanguageBind audio checkpoint (a local directory or hub id); `image_embeds` is the
    embedding.

    Example:
        >>> tower = LanguageBindAudioTower.from_pretrained("LanguageBind/LanguageBind_Audio_FT")
        >>> tower(pixel_values=torch.zeros(1, 3, 112, 1036)).image_embeds  # (1, projection_dim)
    """

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"position_ids$"
    ]

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        self.vision_model.embeddings = GridEmbeddings(config)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, path: str, *args: Any, config: CLIPVisionConfig | None = None, **kwargs: Any
    ) -> Any:
        if config is None:
            raw, _ = PretrainedConfig.get_config_dict(path, subfolder=kwargs.get("subfolder") or "")
            config = tower_config(raw)
        return super().from_pretrained(path, *args, config=config, **kwargs)


class LanguageBindAudioPooledConfig(PooledConfig):
    """`path` (with `subfolder`) is a LanguageBind audio model: `LanguageBind/LanguageBind_Audio_FT`
    or a directory with its config.json and weights."""

    kind: str = "languagebind-audio-pooled"


@register_codec("languagebind-audio-pooled")
class LanguageBindAudioPooled(PooledEncoder):
    """Audio -> LanguageBind audio embeddings as the released pipeline takes them, zero-padded."""

    modality = Modality.AUDIO
    config_class = LanguageBindAudioPooledConfig

    def __init__(self, config: LanguageBindAudioPooledConfig):
        super().__init__(config)
        self.model = self._load(LanguageBindAudioTower, config.subfolder)
        self.front_end = FbankFrontEnd.from_config(self.model.config)

    def embed(self, audio: Sequence[bytes | tuple[np.ndarray, int]]) -> torch.Tensor:
        """Clips as WAV/FLAC bytes or (mono waveform, sample rate) pairs; resampled to 16 kHz."""
        waves = [check_audio(wave) for wave in waves_at(audio, self.front_end.sample_rate)]
        return self._embed_pixels(self.front_end(waves))

    def null(self) -> torch.Tensor:
        """The embedding of all-zero pixel values, the release's null audio input."""
        front, channels = self.front_end, self.model.config.num_channels
        return self._embed_pixels(torch.zeros(1, channels, front.num_mel_bins, front.target_length))

    @torch.no_grad()
    def _embed_pixels(self, pixels_BCMT: torch.Tensor) -> torch.Tensor:
        embeds = self.model(pixel_values=pixels_BCMT.to(self.device, self.dtype)).image_embeds
        return pad_pooled(embeds.float(), self.config.pooled_dim)
