"""Starting OmniFlowTransformer from SD3: with audio absent it computes SD3's image prediction."""

from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from omniflow.convert.__main__ import main
from omniflow.convert.sd3 import transformer_from_sd3
from omniflow.transformer import OmniFlowTransformer

TINY_SD3 = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 24,
    "out_channels": 4,
    "pos_embed_max_size": 16,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_sd3(**overrides) -> SD3Transformer2DModel:
    """A tiny SD3 with every parameter drawn from N(0, 0.2), so zero-init cannot hide a bug."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**{**TINY_SD3, **overrides}).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def saved_sd3(path: Path, **overrides) -> tuple[SD3Transformer2DModel, Path]:
    model = tiny_sd3(**overrides)
    model.save_pretrained(path)
    return model, path


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "image": torch.randn(2, 4, 8, 8, generator=g),
        "text": torch.randn(2, 5, 32, generator=g),
        "pooled": torch.randn(2, 24, generator=g),
        "t": torch.tensor([0.9, 0.25]),
    }


def assert_sd3_parity(sd3: SD3Transformer2DModel, model: OmniFlowTransformer) -> None:
    x = inputs()
    with torch.no_grad():
        expected = sd3(
            hidden_states=x["image"],
            encoder_hidden_states=x["text"],
            pooled_projections=x["pooled"],
            timestep=x["t"] * 1000,
        ).sample
        ours = model.eval()(
            {"image": x["image"], "text": x["text"]}, {"image": x["t"], "text": x["t"]}, x["pooled"]
        )
    torch.testing.assert_close(ours["image"], expected, atol=1e-5, rtol=0)
    assert ours["text"].shape == (2, 5, 32) and torch.isfinite(ours["text"]).all()


@pytest.mark.parametrize("qk_norm", [None, "rms_norm", "layer_norm"])
def test_image_output_equals_sd3(tmp_path, qk_norm):
    sd3, path = saved_sd3(tmp_path / "sd3", qk_norm=qk_norm)
    model = transformer_from_sd3(str(path))
    assert model.streams == ("image", "text", "audio") and model.config.qk_norm == qk_norm
    assert_sd3_parity(sd3, model)


def test_loaded_model_and_pipeline_root(tmp_path):
    sd3, _ = saved_sd3(tmp_path / "pipeline" / "transformer")
    assert_sd3_parity(sd3, transformer_from_sd3(tmp_path / "pipeline", streams=("image", "text")))
    assert_sd3_parity(sd3, transformer_from_sd3(sd3))


def test_text_and_audio_timestep_embedders_are_zero(tmp_path):
    _, path = saved_sd3(tmp_path / "sd3")
    model = transformer_from_sd3(str(path))
    t, pooled = torch.tensor([0.1, 0.7]) * 1000, torch.randn(2, 24)
    for modality in ("text", "audio"):
        assert torch.count_nonzero(model.time_embed[modality](t, pooled)) == 0
    assert torch.count_nonzero(model.time_embed["image"](t, pooled)) > 0


def test_audio_init_image_copies_block_weights(tmp_path):
    sd3, path = saved_sd3(tmp_path / "sd3")
    model = transformer_from_sd3(
        str(path), audio_init="image", audio_in_channels=4, audio_sample_size=(16, 4)
    )
    for i, block in enumerate(model.blocks):
        image, audio = block.streams["image"], block.streams["audio"]
        for name in (
            "norm1.linear.weight",
            "to_q.weight",
            "to_k.bias",
            "to_out.weight",
            "ff.net.2.weight",
        ):
            torch.testing.assert_close(
                audio.get_parameter(name), image.get_parameter(name), atol=0, rtol=0
            )
        assert audio.to_q.weight.data_ptr() != image.to_q.weight.data_ptr()
        torch.testing.assert_close(
            image.to_q.weight, sd3.transformer_blocks[i].attn.to_q.weight, atol=0, rtol=0
        )
    torch.testing.assert_close(
        model.audio_norm_out.linear.weight, model.image_norm_out.linear.weight, atol=0, rtol=0
    )
    assert (
        model.audio_proj_out.weight.shape == (16, 16)
        and torch.count_nonzero(model.audio_proj_out.weight) == 0
    )
    assert_sd3_parity(
        sd3, model
    )  # seeding audio must not change SD3's function when audio is absent


def test_audio_init_fresh_is_not_a_copy(tmp_path):
    _, path = saved_sd3(tmp_path / "sd3")
    model = transformer_from_sd3(str(path))
    block = model.blocks[0]
    assert not torch.equal(block.streams["audio"].to_q.weight, block.streams["image"].to_q.weight)


def test_sd3_cli_round_trip(tmp_path):
    sd3, _ = saved_sd3(tmp_path / "pipeline" / "transformer")
    out = tmp_path / "converted"
    assert (
        main(
            [
                "sd3",
                str(tmp_path / "pipeline"),
                str(out),
                "--audio-init",
                "image",
                "--subfolder",
                "transformer",
            ]
        )
        == 0
    )
    assert_sd3_parity(sd3, OmniFlowTransformer.from_pretrained(out))


def test_missing_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-sd3"
    with pytest.raises(ValueError, match="no-such-sd3"):
        transformer_from_sd3(str(missing))
    assert main(["sd3", str(missing), str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_hub_id_is_refused_offline():
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        transformer_from_sd3("some-org/some-sd3")


def test_dual_attention_is_rejected():
    with pytest.raises(ValueError, match="dual_attention_layers"):
        transformer_from_sd3(tiny_sd3(dual_attention_layers=(0,)))
