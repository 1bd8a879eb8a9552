"""Merging: the rules against their definitions, errors that name the culprit, `python -m jobs.merge`."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from jobs.merge import MergeJobConfig, main
from omniflow import storage as st
from omniflow.config import load_config
from omniflow.ema import EMA
from omniflow.merge import (
    MergeConfig,
    MergeError,
    merge_streams,
    stream_of,
    stream_sources,
    task_arithmetic,
    weighted_average,
)
from omniflow.model_dir import (
    load_model_dir,
    read_model_info,
    save_model_dir,
    save_training_checkpoint,
    transformer_config,
)
from omniflow.objective import flow_loss
from omniflow.presets import build_transformer
from omniflow.sampling import generate
from omniflow.tasks import get_task

STREAMS = ("image", "text", "audio")
SHAPES = {"image": (4, 8, 8), "text": (4, 16), "audio": (4, 16, 8)}


def _state(seed: int, streams=STREAMS) -> dict[str, torch.Tensor]:
    return build_transformer("tiny", seed=seed, streams=streams).state_dict()


def _weighted(a: torch.Tensor, b: torch.Tensor, w: tuple[float, float]) -> torch.Tensor:
    return (w[0] * a + w[1] * b) / (w[0] + w[1])


def test_stream_of_partitions_the_parameters_by_stream():
    """A stream's names are exactly those that vanish when the model is built without that stream."""
    full = _state(0)
    assert {stream_of(name) for name in full} == set(STREAMS)  # nothing shared in this architecture
    for stream in STREAMS:
        without = set(_state(0, tuple(s for s in STREAMS if s != stream)))
        assert without == {name for name in full if stream_of(name) != stream}
    assert stream_of("time_embed.audio.text_embedder.linear_1.weight") == "audio"
    assert stream_of("blocks.1.streams.text.to_k.weight") == "text"
    assert stream_of("text_proj_out.bias") == "text"
    assert stream_of("norm_out.linear.weight") == "shared"


def test_merge_streams_equals_its_definition():
    sd1, sd2 = _state(1), _state(2)
    # A parameter outside every stream, as a future shared layer would be, is averaged too.
    sd1["shared_embed.weight"], sd2["shared_embed.weight"] = torch.randn(3, 2), torch.randn(3, 2)
    text_w, shared_w = (0.7, 0.3), (1.0, 3.0)
    merged = merge_streams(sd1, sd2, text_weights=text_w, shared_weights=shared_w)
    assert set(merged) == set(sd1)
    for name, value in merged.items():
        stream = stream_of(name)
        if stream == "image":
            assert torch.equal(value, sd1[name]), name
        elif stream == "audio":
            assert torch.equal(value, sd2[name]), name
        else:
            weights = text_w if stream == "text" else shared_w
            torch.testing.assert_close(value, _weighted(sd1[name], sd2[name], weights), rtol=0, atol=1e-6)


def test_stage_models_without_a_stream_give_a_full_model():
    stage1, stage2 = _state(1, ("image", "text")), _state(2, ("text", "audio"))
    assert stream_sources(stage1, stage2) == {"image": "image_model", "text": "average", "audio": "audio_model"}
    merged = merge_streams(stage1, stage2, text_weights=(1.0, 1.0))
    assert set(merged) == set(_state(0))
    assert all(torch.equal(merged[n], stage2[n]) for n in merged if stream_of(n) == "audio")
    # Swapped roles: each model still gives the stream only it has.
    swapped = merge_streams(stage2, stage1)
    assert all(torch.equal(swapped[n], stage1[n]) for n in swapped if stream_of(n) == "image")
    assert all(torch.equal(swapped[n], stage2[n]) for n in swapped if stream_of(n) == "audio")


def test_mismatches_are_named():
    sd1, sd2 = _state(1), _state(2)
    sd2["text_embed.weight"] = torch.zeros(16, 8)
    with pytest.raises(ValueError, match=r"text_embed\.weight has mismatched shapes"):
        merge_streams(sd1, sd2)
    sd2 = _state(2)
    del sd2["blocks.0.streams.text.norm_q.weight"]
    with pytest.raises(MergeError, match=r"blocks\.0\.streams\.text\.norm_q\.weight is only in image_model"):
        merge_streams(sd1, sd2)
    with pytest.raises(MergeError, match="text_weights must be non-negative"):
        merge_streams(sd1, _state(2), text_weights=(0.0, 0.0))
    with pytest.raises(MergeError, match=r"image_proj_out\.bias has mismatched shapes"):
        task_arithmetic(sd1, [{**sd1, "image_proj_out.bias": torch.zeros(3)}], [1.0])


def test_weighted_average_and_task_arithmetic_closed_forms():
    sds = [_state(s) for s in (1, 2, 3)]
    weights = [1.0, 2.0, 5.0]
    average = weighted_average(sds, weights)
    for name, value in average.items():
        expected = sum(w * sd[name] for w, sd in zip(weights, sds)) / sum(weights)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(weighted_average(sds[:1], [3.0]), sds[0], rtol=0, atol=1e-6)

    base, ft = sds[0], sds[1:]
    merged = task_arithmetic(base, ft, [0.5, -1.5])
    for name, value in merged.items():
        expected = base[name] + 0.5 * (ft[0][name] - base[name]) - 1.5 * (ft[1][name] - base[name])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(task_arithmetic(base, ft[:1], [1.0]), ft[0], rtol=0, atol=1e-6)
    with pytest.raises(MergeError, match="only in"):
        weighted_average([sds[0], _state(1, ("image", "text"))], [1.0, 1.0])


def test_shipped_config_validates():
    config = load_config(MergeJobConfig, "configs/merge_shapesworld.yaml", ["output=s3://bucket/merged"])
    assert config.recipe.method == "streams" and config.recipe.inputs() == [
        "runs/shapesworld/train/stage1/model", "runs/shapesworld/train/stage2/model"]


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="weights has 1 entries for 2 models"):
        MergeConfig.model_validate({"output": "o", "recipe": {"method": "average", "models": ["a", "b"], "weights": [1]}})
    with pytest.raises(ValidationError, match="text_weights"):
        MergeConfig.model_validate({"output": "o", "recipe": {
            "method": "streams", "image_model": "a", "audio_model": "b", "text_weights": [-1, 1]}})


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def stage_models(tmp_path_factory):
    """Stage 1: an image-text model directory. Stage 2: a text-audio training checkpoint with EMA."""
    root = tmp_path_factory.mktemp("stages")
    # Codec weights where a codec build left them: each stage's model directory takes a copy.
    (root / "codec-weights" / "image").mkdir(parents=True)
    (root / "codec-weights" / "image" / "config.json").write_text("{}")
    (root / "codec-weights" / "audio" / "vae").mkdir(parents=True)
    (root / "codec-weights" / "audio" / "vae" / "config.json").write_text("{}")
    stage1 = build_transformer("tiny", seed=1, streams=("image", "text"))
    save_model_dir(stage1, root / "stage1", extra={
        "preset": "tiny", "latent_shapes": {"image": [4, 8, 8], "text": [4, 16]},
        "codecs": {"image": {"kind": "image-vae", "path": str(root / "codec-weights" / "image")}}})
    stage2 = build_transformer("tiny", seed=2, streams=("text", "audio"))
    ema = EMA(stage2, decay=0.5)
    with torch.no_grad():
        for p in stage2.parameters():
            p.add_(1.0)
    ema.update(stage2, 1)
    info = {"preset": "tiny-audio", "latent_shapes": {"text": [4, 16], "audio": [4, 16, 8]},
            "codecs": {"audio": {"kind": "mel-vae", "path": str(root / "codec-weights" / "audio")}}}
    save_training_checkpoint(root / "stage2", model_state=stage2.state_dict(), model_config=transformer_config(stage2),
                             step=7, ema_state=ema.state_dict(), model_info=info)
    return root, stage1.state_dict(), {**stage2.state_dict(), **ema.state_dict()}


def _write_config(path, **fields) -> str:
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def test_merge_job_end_to_end(tmp_path, stage_models):
    root, stage1, stage2_ema = stage_models
    config = _write_config(tmp_path / "merge.yaml", output=str(tmp_path / "merged"), recipe={
        "method": "streams", "image_model": str(root / "stage1"), "audio_model": str(root / "stage2"),
        "text_weights": [0.25, 0.75]})
    assert main(["--config", config]) == 0

    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == [
        "audio_codec", "image_codec", "manifest.json", "merge.json", "model_index.json", "omniflow.json", "transformer"]
    assert (out / "image_codec" / "config.json").is_file() and (out / "audio_codec" / "vae" / "config.json").is_file()
    model = load_model_dir(out)
    assert model.streams == STREAMS
    for name, value in model.state_dict().items():
        stream = stream_of(name)
        expected = {"image": stage1.get(name), "audio": stage2_ema.get(name)}.get(stream)
        if stream == "text":
            expected = _weighted(stage1[name], stage2_ema[name], (0.25, 0.75))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)

    recipe = json.loads((out / "merge.json").read_text())
    assert recipe["stream_sources"] == {"image": "image_model", "text": "average", "audio": "audio_model"}
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["elements"]
    assert sum(counts["by_source"].values()) == counts["total"] == sum(t.numel() for t in model.state_dict().values())
    assert [(i["kind"], i.get("step")) for i in manifest["inputs"]] == [("model_dir", None), ("training_checkpoint", 7)]
    assert manifest["recipe"] == recipe and manifest["config"]["recipe"]["text_weights"] == [0.25, 0.75]
    assert read_model_info(out) == {  # per stream from the model that gave it, the rest from the image model
        "preset": "tiny", "latent_shapes": {"image": [4, 8, 8], "text": [4, 16], "audio": [4, 16, 8]},
        "codecs": {"image": {"kind": "image-vae", "path": str(out.absolute() / "image_codec")},
                   "audio": {"kind": "mel-vae", "path": str(out.absolute() / "audio_codec")}}}
    on_disk = json.loads((out / "omniflow.json").read_text())["codecs"]  # relative: the directory moves whole
    assert {m: c["path"] for m, c in on_disk.items()} == {"image": "image_codec", "audio": "audio_codec"}

    # The merged model trains (one optimizer step moves its weights) and samples.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = {m: torch.randn(3, *s, generator=g) for m, s in SHAPES.items()}
    before = model.image_proj_out.weight.detach().clone()
    loss = flow_loss(model, x0, [get_task("t2a"), get_task("i2t"), get_task("joint")], generator=g).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.image_proj_out.weight)
    audio = generate(model.eval(), "t2a", conditions={"text": x0["text"]}, target_shapes={"audio": SHAPES["audio"]},
                     steps=3, guidance=2.0, generator=torch.Generator().manual_seed(0))["audio"]
    assert audio.shape == (3, *SHAPES["audio"]) and torch.isfinite(audio).all()


def test_merge_job_errors(tmp_path, stage_models, capsys):
    root, *_ = stage_models
    assert main(["--config", _write_config(tmp_path / "a.yaml", output="x", recipe={"method": "blend"})]) == 2
    missing = _write_config(tmp_path / "b.yaml", output=str(tmp_path / "o"), recipe={
        "method": "export", "model": str(tmp_path / "nowhere")})
    assert main(["--config", missing]) == 1
    assert "nowhere is neither a model directory" in capsys.readouterr().err
    torch.manual_seed(0)
    save_model_dir(build_transformer("tiny", num_layers=3, streams=("audio",)), tmp_path / "deeper")
    mismatched = _write_config(tmp_path / "c.yaml", output=str(tmp_path / "o"), recipe={
        "method": "streams", "image_model": str(root / "stage1"), "audio_model": str(tmp_path / "deeper")})
    assert main(["--config", mismatched]) == 1
    assert "config field num_layers differs: 2 in the image model, 3 in the audio model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_job_on_s3_exports_ema(tmp_path, stage_models, s3_server):
    """Inputs and output on S3: a training checkpoint's EMA weights exported in bfloat16."""
    root, _, stage2_ema = stage_models
    bucket = s3_server.new_bucket()
    storage = s3_server.storage
    remote = f"s3://{bucket}/checkpoints/stage2"
    st.upload_dir(root / "stage2", remote, storage)
    output = f"s3://{bucket}/models/stage2"
    st.write_bytes_atomic(f"{output}/stale.safetensors", b"from an earlier run", storage)
    config = _write_config(tmp_path / "export.yaml", output=output, recipe={"method": "export", "model": remote},
                           dtype="bfloat16", storage={"endpoint_url": s3_server.endpoint_url})
    assert main(["--config", config]) == 0

    names = sorted(p.removeprefix(output + "/") for p in st.list_files(output, storage))
    assert names == ["audio_codec/vae/config.json", "manifest.json", "merge.json", "model_index.json", "omniflow.json",
                     "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
    local = Path(st.local_copy(output, storage, cache_root=tmp_path))
    model = load_model_dir(local, dtype=torch.bfloat16)
    assert all(torch.equal(v, stage2_ema[k].to(torch.bfloat16)) for k, v in model.state_dict().items())
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["inputs"][0]["path"] == remote and manifest["outputs"]["model_dir"] == output
