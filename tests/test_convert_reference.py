"""Conversion of the OmniFlow reference checkpoint: parity with the reference on a fixture."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniflow.convert.__main__ import main
from omniflow.convert.reference import (
    ReferenceLayout,
    config_from_reference,
    convert_reference,
    load_reference_dir,
    reference_parameter_names,
    state_dict_from_reference,
    transformer_from_reference,
)
from omniflow.transformer import OmniFlowTransformer

FIXTURES = Path(__file__).parent / "fixtures" / "omniflow_reference"
FIXTURE = FIXTURES / "omniflow_ref_seed0.safetensors"
REPO_ROOT = Path(__file__).parents[1]
OUTPUT_NAMES = [
    f"{mode}.{m}" for mode in ("joint_cond", "split_cond") for m in ("image", "text", "audio")
]
LAST_BLOCK_UNUSED = [
    "transformer_blocks.2.attn.add_q_proj.bias",
    "transformer_blocks.2.attn.add_q_proj.weight",
    "transformer_blocks.2.ff_context.net.0.proj.bias",
    "transformer_blocks.2.ff_context.net.0.proj.weight",
    "transformer_blocks.2.ff_context.net.2.bias",
    "transformer_blocks.2.ff_context.net.2.weight",
]


@pytest.fixture(scope="module")
def fixture() -> dict:
    tensors = load_file(FIXTURE)
    return {
        "config": json.loads(FIXTURE.with_suffix(".json").read_text()),
        **{
            name: {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            for name in ("state_dict", "inputs", "outputs")
        },
    }


@pytest.fixture(scope="module")
def parameter_order() -> dict[str, list[str]]:
    return json.loads((FIXTURES / "reference_parameter_order.json").read_text())


def run_fixture_inputs(model: OmniFlowTransformer, inputs: dict) -> dict[str, torch.Tensor]:
    latents = {
        "image": inputs["hidden_states"],
        "text": inputs["encoder_hidden_states"],
        "audio": inputs["audio_hidden_states"],
    }
    t = {
        "image": inputs["timestep"],
        "text": inputs["timestep_text"],
        "audio": inputs["timestep_audio"],
    }
    with torch.no_grad():
        return model.eval()(
            latents, {m: v / 1000 for m, v in t.items()}, inputs["pooled_projections"]
        )


def write_reference_dir(
    root: Path, config: dict, state_dict: dict, *, fmt: str = "safetensors"
) -> Path:
    """A release-shaped directory: root/transformer/{config.json, diffusion_pytorch_model.*}."""
    transformer = root / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text(
        json.dumps({"_class_name": "OmniFlowTransformerModel", **config})
    )
    weights = {k: v.contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        save_file(weights, transformer / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(weights, transformer / "diffusion_pytorch_model.bin")
    return root


def test_check_fixture_cli_matches_reference():
    result = subprocess.run(
        [sys.executable, "-m", "omniflow.convert", "check-fixture", str(FIXTURE)],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(OUTPUT_NAMES)
    assert all(err < 1e-4 for err in errors.values()), errors


def test_dropped_keys_are_exactly_the_last_blocks_unused_ones(fixture):
    ours, dropped = state_dict_from_reference(fixture["state_dict"], 3)
    assert sorted(dropped) == LAST_BLOCK_UNUSED
    # the shared qk norm serves every stream that uses it; the pre-only text stream has no query
    shared_q = fixture["state_dict"]["transformer_blocks.2.attn.norm_q.weight"]
    for stream in ("image", "audio"):
        assert ours[f"blocks.2.streams.{stream}.norm_q.weight"] is shared_q
    assert "blocks.2.streams.text.norm_q.weight" not in ours
    assert "blocks.2.streams.text.norm_k.weight" in ours


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reference_cli_round_trip(tmp_path, fixture, fmt):
    src = write_reference_dir(
        tmp_path / "release", fixture["config"], fixture["state_dict"], fmt=fmt
    )
    out = tmp_path / "converted"
    # the .bin case passes the transformer/ folder itself
    assert (
        main(["reference", str(src if fmt == "safetensors" else src / "transformer"), str(out)])
        == 0
    )
    model = OmniFlowTransformer.from_pretrained(out)
    assert model.config.text_out_dim == 1536 and not model.config.split_timestep_conditioning
    outputs = run_fixture_inputs(model, fixture["inputs"])
    for m in ("image", "text", "audio"):
        torch.testing.assert_close(
            outputs[m], fixture["outputs"][f"joint_cond.{m}"], atol=1e-4, rtol=0
        )


def test_reference_cli_split_conditioning(tmp_path, fixture):
    src = write_reference_dir(tmp_path / "release", fixture["config"], fixture["state_dict"])
    out = tmp_path / "converted"
    assert main(["reference", str(src), str(out), "--split-timestep-conditioning"]) == 0
    outputs = run_fixture_inputs(OmniFlowTransformer.from_pretrained(out), fixture["inputs"])
    for m in ("image", "text", "audio"):
        torch.testing.assert_close(
            outputs[m], fixture["outputs"][f"split_cond.{m}"], atol=1e-4, rtol=0
        )


def test_parameter_order_matches_the_reference_class(parameter_order):
    for add_audio in (True, False):
        for qk_norm in (None, "layer_norm", "rms_norm"):
            expected = parameter_order[f"add_audio={add_audio},qk_norm={qk_norm}"]
            assert reference_parameter_names(ReferenceLayout(3, add_audio, qk_norm)) == expected


def ema_file(path: Path, shadow: list[torch.Tensor]) -> None:
    torch.save({"decay": 0.999, "optimization_step": 10, "shadow_params": shadow}, path)


def test_reference_cli_ema(tmp_path, fixture, parameter_order):
    sd = fixture["state_dict"]
    names = parameter_order["add_audio=True,qk_norm=layer_norm"]
    shadow = [sd[n] * 0.5 + 0.01 * i for i, n in enumerate(names)]
    src = write_reference_dir(tmp_path / "release", fixture["config"], sd, fmt="bin")
    ema_file(src / "transformer" / "ema_transformer.pt", shadow)
    out = tmp_path / "converted"
    assert main(["reference", str(src), str(out), "--ema"]) == 0
    model = OmniFlowTransformer.from_pretrained(out)
    ema = dict(zip(names, shadow))
    params = model.state_dict()
    pairs = {
        "time_embed.image.timestep_embedder.linear_1.weight": (
            "time_text_embed.timestep_embedder.linear_1.weight"
        ),
        "time_embed.text.text_embedder.linear_2.bias": (
            "time_image_embed.text_embedder.linear_2.bias"
        ),
        "blocks.1.streams.audio.to_q.weight": "transformer_blocks.1.attn.aud_q_proj.weight",
        "blocks.1.streams.text.norm_k.bias": "transformer_blocks.1.attn.norm_k.bias",
        "image_proj_out.weight": "proj_out.weight",
    }
    for ours, ref in pairs.items():
        torch.testing.assert_close(params[ours], ema[ref], atol=0, rtol=0)
    # buffers are not EMA parameters: the positional table stays the checkpoint's
    torch.testing.assert_close(
        params["image_embed.pos_embed"], sd["pos_embed.pos_embed"], atol=0, rtol=0
    )
    raw = run_fixture_inputs(transformer_from_reference(fixture["config"], sd), fixture["inputs"])
    assert not torch.allclose(run_fixture_inputs(model, fixture["inputs"])["image"], raw["image"])


def test_ema_with_wrong_count_or_shape_is_rejected(tmp_path, fixture, parameter_order):
    sd = fixture["state_dict"]
    names = parameter_order["add_audio=True,qk_norm=layer_norm"]
    src = write_reference_dir(tmp_path / "release", fixture["config"], sd)
    path = src / "transformer" / "ema_transformer.pt"
    ema_file(path, [sd[n] for n in names[:-1]])
    with pytest.raises(ValueError, match="shadow parameters"):
        load_reference_dir(src, ema=True)
    ema_file(path, [sd[n] for n in reversed(names)])
    with pytest.raises(ValueError, match="pos_embed.proj.weight"):
        load_reference_dir(src, ema=True)


def test_attached_text_decoder_is_dropped(tmp_path, fixture, parameter_order):
    """The release saves the model with its text VAE attached; that VAE registers last."""
    sd = {**fixture["state_dict"], "text_decoder.lm_head.weight": torch.randn(5, 4)}
    names = parameter_order["add_audio=True,qk_norm=layer_norm"]
    conversion = convert_reference(fixture["config"], sd)
    assert "text_decoder.lm_head.weight" in conversion.dropped_keys
    src = write_reference_dir(tmp_path / "release", fixture["config"], sd, fmt="bin")
    ema_file(
        src / "ema_transformer.pt", [sd[n] for n in names] + [sd["text_decoder.lm_head.weight"]]
    )
    config, ema_sd = load_reference_dir(src, ema=True)
    transformer_from_reference(config, ema_sd)


def test_unexpected_or_missing_key_is_named(fixture):
    sd = {**fixture["state_dict"], "transformer_blocks.0.attn.mystery.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.mystery\.weight"):
        transformer_from_reference(fixture["config"], sd)
    sd = {
        k: v
        for k, v in fixture["state_dict"].items()
        if k != "transformer_blocks.1.ff_audio.net.2.bias"
    }
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.ff_audio\.net\.2\.bias"):
        transformer_from_reference(fixture["config"], sd)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"caption_projection_dim": 24}, "caption_projection_dim"),
        ({"use_audio_mae": True}, "use_audio_mae"),
        ({"add_clip": True}, "add_clip"),
        ({"dual_attention_layers": [0]}, "dual_attention_layers"),
    ],
)
def test_unsupported_reference_configs_are_rejected(fixture, override, field):
    with pytest.raises(ValueError, match=field):
        config_from_reference({**fixture["config"], **override})


def test_reference_without_audio(fixture):
    """No audio: two streams; the text timestep embedder (absent there) is zeroed."""
    layout = ReferenceLayout(3, add_audio=False, qk_norm="layer_norm")
    sd = {**fixture["state_dict"]}
    for key in list(sd):
        if (
            key.startswith(
                (
                    "time_image_embed.",
                    "time_aud_embed.",
                    "audio_embedder.",
                    "norm_out_aud.",
                    "proj_out_aud.",
                    "context_decoder.",
                )
            )
            or ".attn.aud_" in key
            or "to_aud_out" in key
            or ".ff_audio." in key
            or ".norm1_audio." in key
        ):
            del sd[key]
    for i in range(3):  # diffusers' Attention has per-stream qk norms
        for which in ("q", "k"):
            sd[f"transformer_blocks.{i}.attn.norm_added_{which}.weight"] = torch.rand(8)
            sd[f"transformer_blocks.{i}.attn.norm_added_{which}.bias"] = torch.rand(8)
    assert set(sd) >= set(reference_parameter_names(layout))
    conversion = convert_reference({**fixture["config"], "add_audio": False}, sd)
    model = conversion.model
    assert model.streams == ("image", "text")
    assert conversion.fresh_keys and all(
        k.startswith(("time_embed.text.", "text_proj.")) for k in conversion.fresh_keys
    )
    t = torch.tensor([0.3, 0.9])
    assert torch.count_nonzero(model.time_embed["text"](t * 1000, torch.randn(2, 24))) == 0
    torch.testing.assert_close(
        model.blocks[0].streams["text"].norm_q.weight,
        sd["transformer_blocks.0.attn.norm_added_q.weight"],
    )


def test_missing_source_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-release"
    assert main(["reference", str(missing), str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(ValueError, match="no-such-release"):
        load_reference_dir(missing)


def test_existing_output_is_not_overwritten(tmp_path, fixture):
    src = write_reference_dir(tmp_path / "release", fixture["config"], fixture["state_dict"])
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["reference", str(src), str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
