"""Log-mel front end (AudioLDM / HiFi-GAN conventions) and a Griffin-Lim inverse, in torch ops.

AudioLDM2's VAE sees what its data loader computes (AudioLDM's `TacotronSTFT`): a periodic Hann
window, the signal reflect-padded by n_fft/2 on both sides, STFT magnitudes (not power), a Slaney
mel filterbank with Slaney area normalisation (librosa's `filters.mel` defaults), and
`log(clamp(mel, min=1e-5))`. A clip of N = T * hop samples gives T + 1 frames; AudioLDM crops the
spectrogram to its target length T (1024 frames for 10.24 s at 16 kHz), so the last frame is
dropped. The same conventions (with 22.05 kHz, hop 256, 80 mels) are HiFi-GAN V1's.

All functions are pure: the configuration comes in as a `MelConfig`, randomness as a generator.
"""

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class MelConfig(BaseModel):
    """Front-end settings; the defaults are AudioLDM2's (16 kHz, 10.24 s, 1024 x 64 log-mels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sample_rate: int = Field(16_000, gt=0)
    n_fft: int = Field(1024, gt=0)
    hop_length: int = Field(160, gt=0)
    win_length: int = Field(1024, gt=0)
    n_mels: int = Field(64, gt=0)
    f_min: float = Field(0.0, ge=0)
    f_max: float = Field(8000.0, gt=0)
    num_frames: int = Field(
        1024, gt=0, description="spectrogram frames T per clip; a clip is T * hop samples"
    )
    log_clamp: float = Field(
        1e-5, gt=0, description="magnitudes below this are clamped before the log"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "MelConfig":
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.f_max > self.sample_rate / 2:
            raise ValueError(
                f"f_max ({self.f_max}) is above the Nyquist frequency ({self.sample_rate / 2})"
            )
        if self.f_min >= self.f_max:
            raise ValueError(f"f_min ({self.f_min}) must be below f_max ({self.f_max})")
        return self

    @property
    def num_samples(self) -> int:
        """Samples per clip: T frames of `hop_length` samples."""
        return self.num_frames * self.hop_length

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1


AUDIOLDM2_MEL = MelConfig()
"""AudioLDM2: 16 kHz, n_fft 1024, hop 160, 64 mels over 0-8 kHz, 10.24 s -> (1024, 64)."""

TOY_MEL = MelConfig(num_frames=128)
"""ShapesWorld tones: AudioLDM2's front end on 1.28 s clips -> (128, 64)."""


# Slaney's mel scale (librosa `hz_to_mel(htk=False)`): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (not HTK)."""
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + torch.log(hz.clamp(min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return torch.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of `hz_to_mel`."""
    linear = mel * _F_SP
    log = _MIN_LOG_HZ * torch.exp(_LOGSTEP * (mel.clamp(min=_MIN_LOG_MEL) - _MIN_LOG_MEL))
    return torch.where(mel >= _MIN_LOG_MEL, log, linear)


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float
) -> torch.Tensor:
    """Triangular Slaney-scale filters with Slaney area normalisation -> (n_mels, n_fft // 2 + 1).

    The same matrix as `librosa.filters.mel(sr=..., n_fft=..., n_mels=..., fmin=..., fmax=...)`
    (htk=False, norm="slaney"), which AudioLDM and HiFi-GAN use. Computed in float64, returned
    as float32.
    """
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_edges = torch.linspace(
        float(hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    edges_hz = mel_to_hz(mel_edges)  # (n_mels + 2,): left edge, centre, right edge of each filter
    widths = edges_hz.diff()
    ramps = edges_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.minimum(rising, falling).clamp(min=0)
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # equal area per filter
    return weights.float()


def filterbank_for(cfg: MelConfig, *, device: torch.device | str | None = None) -> torch.Tensor:
    """`mel_filterbank` with `cfg`'s settings -> (n_mels, n_freqs)."""
    return mel_filterbank(
        sample_rate=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        f_min=cfg.f_min,
        f_max=cfg.f_max,
    ).to(device)


def _window(cfg: MelConfig, device: torch.device) -> torch.Tensor:
    """Periodic Hann of `win_length` (scipy `get_window("hann", fftbins=True)`)."""
    return torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32, device=device)


def stft_complex(wave_BN: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Centred STFT (reflect padding of n_fft/2) -> complex (B, n_freqs, 1 + N // hop)."""
    return torch.stft(
        wave_BN.float(),
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window=_window(cfg, wave_BN.device),
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )


def stft_magnitude(wave_BN: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """|STFT| of waveforms (B, N) -> (B, n_freqs, N // hop); the last frame dropped (AudioLDM)."""
    num_frames = wave_BN.shape[-1] // cfg.hop_length
    return stft_complex(wave_BN, cfg).abs()[..., :num_frames]


def log_compress(magnitude: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """AudioLDM/HiFi-GAN dynamic range compression: log(clamp(x, min=1e-5) * C) with C = 1."""
    return torch.log(magnitude.clamp(min=cfg.log_clamp))


def log_mel(wave_BN: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Waveforms (B, N) in [-1, 1] -> log-mel spectrograms (B, 1, T, n_mels), T = N // hop.

    The layout is the one AudioLDM2's VAE takes: time on the height axis, mel bins on the width.
    """
    if wave_BN.ndim != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(wave_BN.shape)}")
    if wave_BN.shape[-1] <= cfg.n_fft // 2:
        raise ValueError(
            f"waveforms need more than n_fft/2 = {cfg.n_fft // 2} samples, got {wave_BN.shape[-1]}"
        )
    mel_BMT = filterbank_for(cfg, device=wave_BN.device) @ stft_magnitude(wave_BN, cfg)
    return log_compress(mel_BMT, cfg).transpose(1, 2).unsqueeze(1)


def mel_to_linear(log_mel_BTM: torch.Tensor, cfg: MelConfig, *, n_iter: int = 32) -> torch.Tensor:
    """Log-mel (B, T, n_mels) -> non-negative linear magnitudes (B, n_freqs, T).

    Starts from the filterbank's pseudo-inverse (clamped at 0), then refines with multiplicative
    non-negative least-squares updates (Lee & Seung), which keep magnitudes >= 0 and reduce
    ||fb @ S - mel||^2 monotonically; `n_iter=0` gives the clamped pseudo-inverse alone.
    """
    fb_MF = filterbank_for(cfg, device=log_mel_BTM.device)
    mel_BMT = torch.exp(log_mel_BTM.float()).transpose(1, 2)
    linear_BFT = (torch.linalg.pinv(fb_MF) @ mel_BMT).clamp(min=0)
    gram_FF = fb_MF.T @ fb_MF
    target_BFT = fb_MF.T @ mel_BMT
    eps = cfg.log_clamp * 1e-3
    for _ in range(n_iter):
        linear_BFT = linear_BFT * target_BFT / (gram_FF @ linear_BFT + eps)
    return linear_BFT


def griffin_lim(
    magnitude_BFT: torch.Tensor,
    cfg: MelConfig,
    *,
    n_iter: int = 32,
    momentum: float = 0.99,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Phase from magnitudes (B, n_freqs, T) by fast Griffin-Lim -> waveforms (B, T * hop).

    The T frames are AudioLDM's (the centred STFT's last frame was dropped), so the last frame is
    repeated to rebuild the T + 1 frames an N-sample centred STFT has. The initial phase is
    uniform random from `generator`, or zero without one; either way the result is deterministic.
    Momentum 0.99 is the "fast Griffin-Lim" of Perraudin et al. (2013), as in librosa/torchaudio.
    """
    num_samples = magnitude_BFT.shape[-1] * cfg.hop_length
    magnitude = torch.cat([magnitude_BFT, magnitude_BFT[..., -1:]], dim=-1).float()
    if generator is None:
        phase = torch.ones_like(magnitude, dtype=torch.complex64)
    else:
        angles = torch.rand(magnitude.shape, generator=generator, device=generator.device)
        phase = torch.polar(torch.ones_like(angles), 2 * math.pi * angles).to(magnitude.device)
    window = _window(cfg, magnitude.device)

    def istft(spec: torch.Tensor) -> torch.Tensor:
        return torch.istft(
            spec,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=window,
            center=True,
            length=num_samples,
        )

    previous = torch.zeros_like(phase)
    for _ in range(n_iter):
        rebuilt = stft_complex(istft(magnitude * phase), cfg)
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        phase = accelerated / accelerated.abs().clamp(min=1e-16)
        previous = rebuilt
    return istft(magnitude * phase)


def mel_to_waveform_griffin_lim(
    log_mel: torch.Tensor,
    cfg: MelConfig,
    *,
    n_iter: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Log-mel (B, 1, T, n_mels) or (B, T, n_mels) -> waveforms (B, T * hop), no learned weights.

    A vocoder for the toy domain: mel -> linear magnitudes (`mel_to_linear`), then `griffin_lim`.
    Deterministic for a given generator (or none). Output is clipped to [-1, 1].

    Example:
        >>> spec = log_mel(torch.randn(1, TOY_MEL.num_samples) * 0.1, TOY_MEL)  # (1, 1, 128, 64)
        >>> wave = mel_to_waveform_griffin_lim(spec, TOY_MEL)                     # (1, 20480)
    """
    log_mel_BTM = log_mel.squeeze(1) if log_mel.ndim == 4 else log_mel
    if log_mel_BTM.ndim != 3 or log_mel_BTM.shape[-1] != cfg.n_mels:
        raise ValueError(
            f"log-mel must be (B, 1, T, {cfg.n_mels}) or (B, T, {cfg.n_mels}), "
            f"got {tuple(log_mel.shape)}"
        )
    wave = griffin_lim(mel_to_linear(log_mel_BTM, cfg), cfg, n_iter=n_iter, generator=generator)
    return wave.clamp(-1.0, 1.0)
