"""LanguageBind's audio tower (`languagebind-audio-pooled`): parity with the released pipeline on
its tiny random fixture (tests/fixtures/omniflow_pipeline)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omniflow.codecs import build_codec
from omniflow.codecs.languagebind import chunk_starts
from omniflow.codecs.media import MediaError, decode_audio, encode_audio

FIXTURE = Path(__file__).parent / "fixtures" / "omniflow_pipeline"
WAV = FIXTURE / "inputs" / "input_audio.wav"
POOLED_DIM = 24  # the fixture release's pooled width
WIDTH = 8  # the tower's projection
TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder():
    path = FIXTURE / "components" / "languagebind_audio"
    return build_codec({"kind": "languagebind-audio-pooled", "path": str(path),
                        "pooled_dim": POOLED_DIM})


def test_front_end_matches_the_release_processor(encoder):
    pixels = encoder.front_end([decode_audio(WAV.read_bytes())[0]])
    expected = load_file(FIXTURE / "preprocess.safetensors")["languagebind_pixel_values"]
    assert pixels.shape == expected.shape == (1, 3, 112, 1036)
    # log mel energies of a float32 FFT: CPUs with other vector units round the FFT differently
    # (seen: 8e-5 relative on a few bins of one AMD machine); a wrong frame, window or filterbank is
    # off by far more
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=5e-4)


@pytest.mark.parametrize("task", ["a2t", "a2i"])
def test_embed_and_null_match_the_release(encoder, task):
    expected = load_file(FIXTURE / f"{task}.old.safetensors")
    wav = WAV.read_bytes()
    embeds = encoder.embed([wav, decode_audio(wav)])  # bytes and a (waveform, rate) pair
    null = encoder.null()
    assert embeds.shape == (2, POOLED_DIM) and null.shape == (1, POOLED_DIM)
    assert torch.all(embeds[:, WIDTH:] == 0) and torch.all(null[:, WIDTH:] == 0)
    embed_expected = expected["audio_encoder.0.out"].expand(2, -1)
    torch.testing.assert_close(embeds[:, :WIDTH], embed_expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(null[:, :WIDTH], expected["audio_encoder.1.out"], atol=1e-5, rtol=0)


def test_longer_clips_take_three_windows(encoder):
    for frames in (1036, 1037, 1038, 1039, 1040, 1100, 5000):
        parts = np.array_split(np.arange(frames - 1036 + 1), 3)
        assert chunk_starts(frames, 1036) == tuple(int(p[0]) if len(p) else 0 for p in parts)
    assert chunk_starts(1035, 1036) == (0, 0, 0)  # where the release fails
    t = np.arange(12 * 16_000) / 16_000
    wave = (0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)  # a rising tone
    pixels = encoder.front_end([wave])
    assert pixels.shape == (1, 3, 112, 1036)
    assert not torch.equal(pixels[0, 0], pixels[0, 2])  # windows from the start and the end


@pytest.mark.parametrize(
    "item, message",
    [
        (b"", "empty"),
        (encode_audio(TONE, 16_000)[:30], "could not be decoded"),  # cut inside the header
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "could not be decoded"),
        (encode_audio(np.zeros(16_000, np.float32), 16_000), "silent"),
        ((np.zeros(16_000, np.float32), 16_000), "silent"),
        ((np.full(16_000, np.nan, np.float32), 16_000), "NaN"),
        ((np.zeros(0, np.float32), 16_000), "no samples"),
    ],
)
def test_bad_media_raise_media_error(encoder, item, message):
    with pytest.raises(MediaError, match=message):
        encoder.embed([item])


def test_a_model_other_than_languagebind_audio_is_refused():
    with pytest.raises(FileNotFoundError, match="not a LanguageBind audio model"):
        build_codec({"kind": "languagebind-audio-pooled", "path": str(FIXTURE / "components" / "clip_l")})
