"""Toy codecs: built from scratch on ShapesWorld, cached, and faithful enough to be read back."""

import json

import pytest
import torch
from safetensors.torch import load_file

from omniflow.modality import Modality
from shapesworld.toy.codecs import ToyCodecsConfig, build_toy_codecs, load_toy_codecs
from shapesworld.toy.pool import build_pool

TINY = {"train_samples": 40, "eval_samples": 6, "image": {"steps": 3}, "audio": {"steps": 3}, "text": {"steps": 3}}


def test_round_trip_accuracy_meets_the_bar(toy_codecs):
    _, manifest = toy_codecs
    print(json.dumps(manifest["round_trip"]), manifest["seconds"])
    for modality in ("image", "audio", "text"):
        accuracy = manifest["round_trip"][modality]
        assert accuracy["both"] >= 0.98, f"{modality} round trip reads {accuracy}"


def test_codecs_load_through_the_registry(toy_codecs):
    out, manifest = toy_codecs
    codecs = load_toy_codecs(out)
    assert set(codecs) == {Modality.IMAGE, Modality.AUDIO, Modality.TEXT}
    for modality, codec in codecs.items():
        assert list(codec.latent_shape) == manifest["latent_shapes"][modality.value]
    assert type(codecs[Modality.IMAGE]).__name__ == "ImageVAECodec"
    assert codecs[Modality.TEXT].decode(codecs[Modality.TEXT].encode(["a red circle"])) == ["a red circle"]


def test_cache_reuses_and_rebuilds_on_change(tmp_path):
    out = tmp_path / "codecs"
    messages = []
    first = build_toy_codecs(out, ToyCodecsConfig.model_validate(TINY), log=messages.append)
    stamp = (out / "codecs.json").stat().st_mtime_ns
    again = build_toy_codecs(out, ToyCodecsConfig.model_validate(TINY), log=messages.append)
    assert again == first and (out / "codecs.json").stat().st_mtime_ns == stamp
    assert any("up to date" in m for m in messages)
    changed = ToyCodecsConfig.model_validate({**TINY, "seed": 1})
    rebuilt = build_toy_codecs(out, changed, log=messages.append)
    assert rebuilt["config_hash"] == changed.digest() != first["config_hash"]
    assert any("rebuilding" in m for m in messages)
    assert not (tmp_path / "codecs.partial").exists()


def test_a_pool_builds_the_same_codecs_side_by_side(tmp_path):
    """Worker processes (one torch thread each) build what the sequential build does: same layout,
    same latent shapes, loadable, with the same weights up to the threads' summation order."""
    config = ToyCodecsConfig.model_validate(TINY)
    alone = build_toy_codecs(tmp_path / "alone", config, log=lambda m: None)
    with build_pool(2) as pool:
        pooled = build_toy_codecs(tmp_path / "pooled", config, log=lambda m: None, pool=pool)
    assert pooled["codecs"] == alone["codecs"] and pooled["latent_shapes"] == alone["latent_shapes"]
    assert set(pooled["seconds"]) == {"image", "audio", "text", "total"}
    # Adam moves a weight by about lr per step whatever its gradient's size, so a summation-order
    # difference in a near-zero gradient can flip one of the 3 steps: at most 3 x lr (3e-3, 4e-3) apart
    for sub in ("image_vae", "audio/vae"):
        a = load_file(next((tmp_path / "alone" / sub).glob("*.safetensors")))
        b = load_file(next((tmp_path / "pooled" / sub).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=0.025, rtol=0) for k in a), sub
    codecs = load_toy_codecs(tmp_path / "pooled")
    assert codecs[Modality.IMAGE].encode(torch.rand(2, 3, 32, 32)).shape == (2, *pooled["latent_shapes"]["image"])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="steps"):
        ToyCodecsConfig.model_validate({"image": {"steps": 0}})
    with pytest.raises(ValueError, match="imgae"):
        ToyCodecsConfig.model_validate({"imgae": {}})


def test_cli_builds_and_prints_accuracy(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))  # JSON is YAML
    result = subprocess.run(
        [sys.executable, "-m", "shapesworld.toy", "build-codecs", "--out", str(tmp_path / "c"), "--config", str(config)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "round trip concept" in result.stdout
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) == {"image", "audio", "text"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: {steps: -1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "shapesworld.toy", "build-codecs", "--out", str(tmp_path / "d"), "--config", str(bad)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2 and "steps" in result.stderr
