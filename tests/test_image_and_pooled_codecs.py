"""Image codec and pooled encoders: tiny random models of the real classes, loaded from disk."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tiny_clip import write_clip_text_towers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from omniflow.codecs import build_codec, codec_kinds
from omniflow.codecs.autoencoder import LatentNorm, fit_latent_stats
from omniflow.codecs.media import MediaError, encode_audio, encode_image


@pytest.fixture(scope="module")
def sd3_like_dir(tmp_path_factory):
    """An SD3-pipeline-shaped directory: vae/, text_encoder(_2)/, tokenizer(_2)/."""
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
    ).save_pretrained(root / "vae")
    return write_clip_text_towers(root)


def test_image_vae_round_trip_shapes(sd3_like_dir):
    codec = build_codec({"kind": "image-vae", "path": str(sd3_like_dir), "subfolder": "vae", "resolution": 32})
    assert codec.latent_shape == (16, 16, 16)
    assert (codec.norm.scaling_factor, codec.norm.shift_factor) == (1.5305, 0.0609)
    images = [np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8), Image.new("RGB", (20, 32))]
    pixels = codec.preprocess([encode_image(images[0]), images[1]])
    assert pixels.shape == (2, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 16, 16, 16) and latents.dtype == torch.float32
    # normalisation: encode = (mode - shift) * scale
    mode = codec.vae.encode(pixels * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (mode - 0.0609) * 1.5305)
    decoded = codec.decode(latents)
    assert decoded.shape == (2, 3, 32, 32) and 0 <= decoded.min() and decoded.max() <= 1
    assert codec.to_uint8(decoded).shape == (2, 32, 32, 3)


def test_image_vae_with_the_released_models_conventions(sd3_like_dir):
    """`shift_on_encode: false` and `sample_posterior: true`, as the released OmniFlow encodes its
    image conditions: z * scaling_factor of a posterior sample; decoding still adds the shift."""
    codec = build_codec({"kind": "image-vae", "path": str(sd3_like_dir), "subfolder": "vae", "resolution": 32,
                         "shift_on_encode": False, "sample_posterior": True})
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = codec.encode(pixels, generator=torch.Generator().manual_seed(1))
    posterior = codec.vae.encode(pixels * 2 - 1).latent_dist
    torch.testing.assert_close(latents, posterior.sample(torch.Generator().manual_seed(1)) * 1.5305)
    assert not torch.allclose(latents, posterior.mode() * 1.5305)
    torch.testing.assert_close(codec.norm.denormalise(latents), latents / 1.5305 + 0.0609)


def test_image_vae_per_channel_normalisation(tmp_path):
    """`fit_latent_stats` stores latents_mean / latents_std; the codec centres and scales each channel
    with them, and decoding hands the decoder the posterior again."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8,
    )
    pixels = torch.rand(24, 3, 16, 16)
    norm = fit_latent_stats(vae, pixels * 2 - 1)
    assert len(norm.mean) == len(norm.std) == 4 and (norm.scaling_factor, norm.shift_factor) == (1.0, 0.0)
    vae.save_pretrained(tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["latents_mean"] == list(norm.mean) and saved["latents_std"] == list(norm.std)

    codec = build_codec({"kind": "image-vae", "path": str(tmp_path / "vae"), "resolution": 16})
    assert codec.norm == norm
    latents = codec.encode(pixels)
    per_channel = latents.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(4), atol=1e-4, rtol=0)
    mode = codec.vae.encode(pixels * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(norm.denormalise(latents), mode, atol=1e-5, rtol=1e-5)


def test_latent_norm_rejects_half_or_misshapen_statistics():
    with pytest.raises(ValueError, match="together"):
        LatentNorm.from_config({"latent_channels": 4, "latents_mean": [0.0] * 4, "latents_std": None})
    with pytest.raises(ValueError, match="one per latent channel"):
        LatentNorm.from_config({"latent_channels": 4, "latents_mean": [0.0] * 3, "latents_std": [1.0] * 3})


def test_image_vae_bfloat16(sd3_like_dir):
    codec = build_codec(
        {"kind": "image-vae", "path": str(sd3_like_dir), "subfolder": "vae", "resolution": 16, "dtype": "bfloat16"}
    )
    latents = codec.encode(torch.rand(1, 3, 16, 16))
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, 16, 8, 8)


def test_image_preprocess_rejects_bad_bytes(sd3_like_dir):
    codec = build_codec({"kind": "image-vae", "path": str(sd3_like_dir), "subfolder": "vae", "resolution": 32})
    png = encode_image(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(MediaError, match="could not be decoded"):
        codec.preprocess([png[: len(png) // 2]])
    with pytest.raises(MediaError, match="empty"):
        codec.preprocess([b""])


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_codec({"kind": "image-vae", "path": str(missing), "subfolder": "vae"})


def test_config_errors_name_the_field(sd3_like_dir):
    with pytest.raises(ValueError, match="not registered"):
        build_codec({"kind": "jpeg-xl", "path": "x"})
    with pytest.raises(ValueError, match="resolution"):
        build_codec({"kind": "image-vae", "path": str(sd3_like_dir), "subfolder": "vae", "resolution": -4})
    with pytest.raises(ValueError, match="resolutoin"):
        build_codec({"kind": "image-vae", "path": str(sd3_like_dir), "resolutoin": 32})
    assert {"image-vae", "clip-text-pooled", "clip-image-pooled", "clap-audio-pooled"} <= set(codec_kinds())


def test_clip_text_pooled_concatenates_both_encoders(sd3_like_dir):
    pooled = build_codec({"kind": "clip-text-pooled", "path": str(sd3_like_dir), "pooled_dim": 24})
    out = pooled.embed(["a red circle", "blue square"])
    assert out.shape == (2, 24)
    assert torch.all(out[:, 20:] == 0), "8 + 12 wide projections, zero-padded to 24"
    ids = pooled.tokenizers[1](["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(out[0, 8:20], pooled.encoders[1](ids).text_embeds[0])
    assert not torch.allclose(out[0], out[1])


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_vision")
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=10,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def test_clip_image_pooled(clip_vision_dir):
    pooled = build_codec({"kind": "clip-image-pooled", "path": str(clip_vision_dir), "pooled_dim": 16})
    rng = np.random.default_rng(0)
    out = pooled.embed([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), encode_image(np.zeros((50, 40, 3), np.uint8))])
    assert out.shape == (2, 16) and torch.all(out[:, 10:] == 0) and out[:, :10].abs().sum() > 0


def test_clap_audio_pooled_resamples_and_pads(clap_dir):
    pooled = build_codec({"kind": "clap-audio-pooled", "path": str(clap_dir), "pooled_dim": 12})
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = pooled.embed([(tone, 16000), encode_audio(tone, 16000, format="FLAC")])
    assert out.shape == (2, 12) and torch.all(out[:, 8:] == 0)
    # the same clip as an array and as 16-bit FLAC bytes: equal up to quantisation
    assert torch.nn.functional.cosine_similarity(out[0, :8], out[1, :8], dim=0) > 0.99
    torch.testing.assert_close(out[:, :8].norm(dim=-1), torch.ones(2))  # CLAP embeddings are unit vectors
    with pytest.raises(MediaError, match="silent"):
        pooled.embed([encode_audio(np.zeros(16000, np.float32), 16000)])
