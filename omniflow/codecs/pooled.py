"""Pooled conditioning vectors: the one vector per sample that the timestep embedders also take.

SD3 pools a prompt as CLIP-L's and CLIP-G's projected text embeddings side by side (768 + 1280 =
2048). OmniFlow conditions on an image or an audio clip the same way, with that modality's
embedding written into the first dimensions of an otherwise zero 2048-wide vector: CLIP vision
image embeddings for images, an audio embedding (CLAP here) for audio. An open_clip model
(`open-clip-image-pooled`, `open-clip-text-pooled`) gives image and text vectors from one
embedding space, as the reference's DataComp ViT-L/14 does and as the toy CLIP does on ShapesWorld.
`mel-vit-audio-pooled` is an audio tower in the LanguageBind manner: a ViT of CLIP's vision
architecture over log-mel spectrograms whose projection was trained into a CLIP text space, so
audio vectors sit in the same space as that CLIP's text and image vectors.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import ConfigDict, Field
from transformers import (
    AutoTokenizer,
    ClapFeatureExtractor,
    ClapModel,
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from omniflow.codecs.base import CodecConfig, load_pretrained, register_codec
from omniflow.codecs.image import as_pil
from omniflow.codecs.media import decode_audio, resample
from omniflow.codecs.mel import TOY_MEL, MelConfig, log_mel
from omniflow.modality import Modality
from omniflow.scoring.clip import ClipConfig, load_clip


class PooledConfig(CodecConfig):
    pooled_dim: int = Field(2048, gt=0)


def pad_pooled(embeds: torch.Tensor, width: int) -> torch.Tensor:
    """(B, D) -> (B, width): D values first, zeros after."""
    if embeds.shape[-1] > width:
        raise ValueError(f"embedding is {embeds.shape[-1]} wide, more than the pooled width {width}")
    return torch.nn.functional.pad(embeds, (0, width - embeds.shape[-1]))


def pooled_inputs(modality: Modality, inputs: "Sequence[str] | torch.Tensor", sample_rate: int | None = None) -> list:
    """What a pooled encoder's `embed` takes, made from the codec's inputs: captions as they are,
    pixels (B, 3, R, R) in [0, 1] as HxWx3 uint8 images, waveforms (B, N) as (wave, sample_rate)."""
    if modality == Modality.IMAGE:
        return list((inputs.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    if modality == Modality.AUDIO:
        return [(wave.numpy(), sample_rate) for wave in inputs]
    return list(inputs)


def waves_at(audio: Sequence[bytes | tuple[np.ndarray, int]], rate: int) -> list[np.ndarray]:
    """Clips (WAV/FLAC bytes or (waveform, sample rate)) as float32 waveforms at `rate`."""
    waves = []
    for clip in audio:
        wave, sr = decode_audio(clip) if isinstance(clip, bytes) else clip
        waves.append(resample(np.asarray(wave, dtype=np.float32), sr, rate))
    return waves


class PooledEncoder(ABC):
    """A batch of one modality's media -> pooled vectors (B, pooled_dim)."""

    modality: ClassVar[Modality]
    config_class: ClassVar[type[PooledConfig]]

    def __init__(self, config: PooledConfig):
        self.config = config
        self.device, self.dtype = torch.device(config.device), config.torch_dtype

    def _load(self, cls: Any, subfolder: str | None) -> Any:
        model = load_pretrained(cls.from_pretrained, self.config.path, subfolder=subfolder, dtype=self.dtype)
        return model.to(self.device).eval().requires_grad_(False)

    @abstractmethod
    def embed(self, media: Any) -> torch.Tensor:
        """(B, pooled_dim) vectors, zero-padded past the encoder's own width."""

    def null(self) -> torch.Tensor:
        """(1, pooled_dim): the vector of the modality's null input, as the released pipeline's
        unconditional branch takes it: the empty caption's for text; an audio tower's all-zero input
        (`MelVitAudioPooled`). Image vectors have none: that pipeline zeroes them."""
        if self.modality == Modality.TEXT:
            return self.embed([""])
        raise NotImplementedError(f"pooled encoder {self.config.kind!r} defines no null input")


CLIP_TEXT_KIND = "clip-text-pooled"


class ClipTextPooledConfig(PooledConfig):
    """`path` is an SD3 pipeline directory (or any directory with these subfolders)."""

    kind: str = CLIP_TEXT_KIND
    encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    tokenizers: tuple[str, ...] = ("tokenizer", "tokenizer_2")
    max_length: int = Field(77, gt=0)

    def weight_dirs(self) -> dict[str, list[str]]:
        return {"path": [*self.encoders, *self.tokenizers]}


@register_codec(CLIP_TEXT_KIND)
class ClipTextPooled(PooledEncoder):
    """Prompts -> SD3's pooled vector: each CLIP's projected text embedding, concatenated."""

    modality = Modality.TEXT
    config_class = ClipTextPooledConfig

    def __init__(self, config: ClipTextPooledConfig):
        super().__init__(config)
        if len(config.encoders) != len(config.tokenizers):
            raise ValueError("encoders and tokenizers must name the same number of subfolders")
        self.encoders = [self._load(CLIPTextModelWithProjection, sub) for sub in config.encoders]
        self.tokenizers = [
            load_pretrained(AutoTokenizer.from_pretrained, config.path, subfolder=sub) for sub in config.tokenizers
        ]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)[0]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled vectors (B, pooled_dim), the encoders' penultimate hidden states side by side
        (B, max_length, sum of their widths)), as SD3's pipeline takes them."""
        pooled, hidden = [], []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(
                list(texts), padding="max_length", max_length=self.config.max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            pooled.append(out.text_embeds.float())
            hidden.append(out.hidden_states[-2].float())
        return pad_pooled(torch.cat(pooled, dim=-1), self.config.pooled_dim), torch.cat(hidden, dim=-1)


class ClipImagePooledConfig(PooledConfig):
    kind: str = "clip-image-pooled"


@register_codec("clip-image-pooled")
class ClipImagePooled(PooledEncoder):
    """Images -> CLIP vision projected image embeddings, zero-padded."""

    modality = Modality.IMAGE
    config_class = ClipImagePooledConfig

    def __init__(self, config: ClipImagePooledConfig):
        super().__init__(config)
        self.model = self._load(CLIPVisionModelWithProjection, config.subfolder)
        self.processor = load_pretrained(CLIPImageProcessor.from_pretrained, config.path, subfolder=config.subfolder)

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """Images as PIL, encoded bytes or HxWx3 uint8 arrays."""
        inputs = self.processor(images=[as_pil(image) for image in images], return_tensors="pt")
        embeds = self.model(pixel_values=inputs.pixel_values.to(self.device, self.dtype)).image_embeds
        return pad_pooled(embeds.float(), self.config.pooled_dim)


class ClapAudioPooledConfig(PooledConfig):
    kind: str = "clap-audio-pooled"


@register_codec("clap-audio-pooled")
class ClapAudioPooled(PooledEncoder):
    """Audio -> CLAP audio embeddings, zero-padded. Audio is resampled to CLAP's rate (48 kHz)."""

    modality = Modality.AUDIO
    config_class = ClapAudioPooledConfig

    def __init__(self, config: ClapAudioPooledConfig):
        super().__init__(config)
        self.model = self._load(ClapModel, config.subfolder)
        self.features = load_pretrained(ClapFeatureExtractor.from_pretrained, config.path, subfolder=config.subfolder)

    @torch.no_grad()
    def embed(self, audio: Sequence[bytes | tuple[np.ndarray, int]]) -> torch.Tensor:
        """Clips as WAV/FLAC bytes or (waveform, sample rate) pairs."""
        rate = self.features.sampling_rate
        inputs = self.features(waves_at(audio, rate), sampling_rate=rate, return_tensors="pt")
        embeds = self.model.get_audio_features(input_features=inputs.input_features.to(self.device, self.dtype))
        if not isinstance(embeds, torch.Tensor):  # newer transformers return an output object
            embeds = embeds.pooler_output
        return pad_pooled(embeds.float(), self.config.pooled_dim)


class OpenClipPooledConfig(PooledConfig):
    """An open_clip model in the directory `path`: its architecture JSON `config_file` (named like
    `model_name`) and checkpoint `pretrained`, both relative to `path` (the toy CLIP's build
    directory is one: `shapesworld-clip.json`, `open_clip_model.safetensors`)."""

    model_config = ConfigDict(protected_namespaces=())
    model_name: str
    config_file: str
    pretrained: str

    def weight_dirs(self) -> dict[str, list[str]]:
        return {"path": [self.config_file, self.pretrained]}

    def clip_config(self) -> ClipConfig:
        root = Path(self.path)
        return ClipConfig(model_name=self.model_name, config_file=str(root / self.config_file),
                          pretrained=str(root / self.pretrained))


class _OpenClipPooled(PooledEncoder):
    config_class = OpenClipPooledConfig

    def __init__(self, config: OpenClipPooledConfig):
        super().__init__(config)
        self.clip = load_clip(config.clip_config(), device=self.device)


@register_codec("open-clip-image-pooled")
class OpenClipImagePooled(_OpenClipPooled):
    """Images -> the open_clip model's unit image embeddings, zero-padded."""

    modality = Modality.IMAGE

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """Images as PIL, encoded bytes or HxWx3 uint8 arrays."""
        pixels = torch.stack([self.clip.preprocess(as_pil(image)) for image in images])
        return pad_pooled(self.clip.embed_images(pixels), self.config.pooled_dim)


@register_codec("open-clip-text-pooled")
class OpenClipTextPooled(_OpenClipPooled):
    """Captions -> the open_clip model's unit text embeddings, zero-padded."""

    modality = Modality.TEXT

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return pad_pooled(self.clip.embed_texts(list(texts)), self.config.pooled_dim)


class MelVitAudioPooledConfig(PooledConfig):
    """A `CLIPVisionModelWithProjection` with one input channel saved in `path` (or its
    `subfolder`), the log-mel front end `mel` it reads, and the statistics its input is
    standardised with."""

    kind: str = "mel-vit-audio-pooled"
    mel: MelConfig = TOY_MEL
    mel_mean: float = 0.0
    mel_std: float = Field(1.0, gt=0)


def mel_pixels(audio: Sequence[Any], config: MelVitAudioPooledConfig, image_size: int) -> torch.Tensor:
    """Clips (encoded bytes or (wave, sample_rate)) -> (B, 1, S, S) standardised log-mel images:
    each clip resampled to the front end's rate, padded or cut to its length, its (mels x frames)
    spectrogram resized to the tower's square input."""
    mel = config.mel
    waves = [np.pad(w[: mel.num_samples], (0, max(0, mel.num_samples - len(w)))) for w in waves_at(audio, mel.sample_rate)]
    spec_B1TM = log_mel(torch.from_numpy(np.stack(waves)), mel)
    spec_B1MT = ((spec_B1TM - config.mel_mean) / config.mel_std).transpose(2, 3)
    return torch.nn.functional.interpolate(spec_B1MT, size=(image_size, image_size), mode="bilinear",
                                           align_corners=False)


@register_codec("mel-vit-audio-pooled")
class MelVitAudioPooled(PooledEncoder):
    """Audio -> the tower's unit embeddings, zero-padded."""

    modality = Modality.AUDIO
    config_class = MelVitAudioPooledConfig

    def __init__(self, config: MelVitAudioPooledConfig):
        super().__init__(config)
        self.model = self._load(CLIPVisionModelWithProjection, config.subfolder)

    @torch.no_grad()
    def embed(self, audio: Sequence[Any]) -> torch.Tensor:
        """Clips as encoded bytes or (wave, sample_rate)."""
        return self._embed_pixels(mel_pixels(audio, self.config, self.model.config.image_size))

    def null(self) -> torch.Tensor:
        """The tower's all-zero (standardised) input."""
        side = self.model.config.image_size
        return self._embed_pixels(torch.zeros(1, self.model.config.num_channels, side, side))

    @torch.no_grad()
    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = self.model(pixel_values=pixels.to(self.device, self.dtype)).image_embeds.float()
        return pad_pooled(torch.nn.functional.normalize(embeds, dim=-1), self.config.pooled_dim)
