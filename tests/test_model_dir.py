"""Model directories and training checkpoints: round trips, atomic replacement, EMA export."""

import json

import pytest
import torch

from omniflow.ema import EMA
from omniflow.model_dir import (
    export_checkpoint,
    load_model_dir,
    load_training_checkpoint,
    read_model_info,
    save_model_dir,
    save_training_checkpoint,
    transformer_config,
)
from omniflow.objective import flow_loss
from omniflow.presets import build_transformer
from omniflow.tasks import get_task


def _inputs(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    latents = {"image": torch.randn(2, 4, 8, 8, generator=g), "text": torch.randn(2, 4, 16, generator=g),
               "audio": torch.randn(2, 4, 16, 8, generator=g)}
    return latents, {m: torch.rand(2, generator=g) for m in latents}


def test_round_trip_gives_identical_outputs(tmp_path, tiny_model):
    info = {"preset": "tiny", "latent_shapes": {"image": [4, 8, 8], "text": [4, 16], "audio": [4, 16, 8]}}
    path = save_model_dir(tiny_model, tmp_path / "model", extra=info)
    assert sorted(p.name for p in path.iterdir()) == ["model_index.json", "omniflow.json", "transformer"]
    assert sorted(p.name for p in (path / "transformer").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((path / "model_index.json").read_text())["transformer"] == ["omniflow.transformer", "OmniFlowTransformer"]
    loaded = load_model_dir(path, dtype=torch.float32, device="cpu")
    assert not loaded.training and read_model_info(path) == info
    latents, t = _inputs()
    with torch.no_grad():
        expected, got = tiny_model(latents, t), loaded(latents, t)
    assert all(torch.equal(expected[m], got[m]) for m in expected)
    assert next(load_model_dir(path, dtype="bfloat16").parameters()).dtype == torch.bfloat16


def test_save_replaces_the_directory_whole(tmp_path, tiny_model):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.safetensors").write_bytes(b"old")
    save_model_dir(tiny_model, target)
    assert not (target / "stale.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old copies left behind
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model_dir(tmp_path)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A model after two optimizer steps, with an EMA that differs from the raw weights."""
    tmp_path = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    model = build_transformer("tiny").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.5)
    latents, _ = _inputs()
    for step in (1, 2):
        loss = flow_loss(model, latents, [get_task("t2i"), get_task("a2t")]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step)
    path = save_training_checkpoint(
        tmp_path / "ckpt", model_state=model.state_dict(), model_config=transformer_config(model), step=2,
        ema_state=ema.state_dict(), optimizer_state=optimizer.state_dict(), data_position={"shard": 1, "row": 4},
        config={"run": "test"},
    )
    return model, optimizer, ema, path


def test_training_checkpoint_round_trip(trained_checkpoint):
    model, optimizer, ema, path = trained_checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "model.safetensors", "optimizer.pt", "state.json"]
    ckpt = load_training_checkpoint(path)
    assert (ckpt["step"], ckpt["data_position"], ckpt["config"]) == (2, {"shard": 1, "row": 4}, {"run": "test"})
    assert json.loads(json.dumps(transformer_config(model))) == ckpt["model_config"]
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in ema.state_dict().items())
    resumed = torch.optim.AdamW(build_transformer("tiny").parameters(), lr=1e-2)
    resumed.load_state_dict(ckpt["optimizer"])
    first = next(iter(optimizer.state.values()))["exp_avg"]
    assert torch.equal(next(iter(resumed.state.values()))["exp_avg"], first)


def test_export_picks_ema_or_raw_weights(tmp_path, trained_checkpoint):
    model, _, ema, path = trained_checkpoint
    ckpt = load_training_checkpoint(path, optimizer=False)
    from_ema = load_model_dir(export_checkpoint(ckpt, tmp_path / "ema", use_ema=True))
    from_raw = load_model_dir(export_checkpoint(ckpt, tmp_path / "raw", use_ema=False, extra={"preset": "tiny"}))
    raw = model.state_dict()
    for name, value in from_ema.state_dict().items():
        expected = ema.shadow.get(name, raw[name])  # buffers are not averaged
        assert torch.equal(value, expected), name
    assert any(not torch.equal(ema.shadow[n], raw[n]) for n in ema.shadow)
    assert all(torch.equal(v, raw[k]) for k, v in from_raw.state_dict().items())
    assert read_model_info(tmp_path / "raw") == {"preset": "tiny"}
    with pytest.raises(ValueError, match="no EMA weights"):
        export_checkpoint({**ckpt, "ema": None}, tmp_path / "x", use_ema=True)
