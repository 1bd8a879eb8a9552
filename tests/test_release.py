"""The released OmniFlow, converted whole (`python -m omniflow.convert release`) from a tiny random
release in its own layout (tests/fixtures/omniflow_pipeline), loaded with the release's sampling
conventions, held to what the release's pipeline computed for its encoders, and served over HTTP."""

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniflow.convert.__main__ import main as convert
from omniflow.inference import AnyToAny, InputPreparer, Prepared, SamplingParams
from omniflow.modality import Modality
from serve.client import Client

FIXTURE = Path(__file__).parent / "fixtures" / "omniflow_pipeline"
COMPONENTS = FIXTURE / "components"
PROMPT = "a red cube on a blue floor"  # the fixture's t2i prompt


def run(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / f"{name}.safetensors")


@pytest.fixture(scope="module")
def released_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    shutil.copytree(COMPONENTS / "audio_vae", root / "audioldm2" / "vae")  # an AudioLDM2 pipeline's layout
    out = root / "models" / "omniflow"
    code = convert(["release", str(COMPONENTS / "release"), str(out), "--clip-l", str(COMPONENTS / "clip_l"),
                    "--t5", str(COMPONENTS / "flan_t5"), "--audio", str(root / "audioldm2"),
                    "--languagebind", str(COMPONENTS / "languagebind_audio"), "--vocoder", "griffin-lim",
                    "--resolution", "64"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def pipe(released_model) -> AnyToAny:
    return AnyToAny.load(released_model)


def test_the_directory_holds_every_part_and_the_reference_conventions(released_model, pipe):
    info = json.loads((released_model / "omniflow.json").read_text())
    assert info["conventions"] == {"profile": "reference"}
    assert info["latent_shapes"] == {"image": [16, 8, 8], "text": [4, 16], "audio": [8, 256, 16]}
    for part in ("transformer", "image_codec", "text_codec", "audio_codec", "text_pooled", "image_pooled",
                 "audio_pooled"):
        assert (released_model / part).is_dir(), part
    assert info["codecs"]["image"]["shift_on_encode"] is False
    assert (pipe.conventions.dropped_condition, pipe.conventions.absent_text) == ("null", "null")
    assert set(pipe.tasks()) >= {"t2i", "i2t", "t2a", "a2t", "i2a", "a2i"}


def test_encoders_compute_what_the_release_computes(pipe):
    """The text VAE, the pooled vectors, the input preprocessing, and the VAEs' null and conditioning
    latents against the release pipeline's own outputs for the same inputs."""
    t2i, i2t, a2t = run("t2i.old"), run("i2t.old"), run("a2t.old")
    text = pipe.codecs[Modality.TEXT].encode([PROMPT, ""])
    torch.testing.assert_close(text, torch.cat([t2i["text_vae_encode.0.out"], t2i["text_vae_encode.1.out"]]))
    torch.testing.assert_close(pipe.null_latents[Modality.TEXT], t2i["text_vae_encode.1.out"])
    pooled = pipe.pooled[Modality.TEXT].embed([PROMPT, ""])
    torch.testing.assert_close(pooled, torch.cat([t2i["encode_prompt.pooled_prompt_embeds"],
                                                  t2i["encode_prompt.negative_pooled_prompt_embeds"]]))
    torch.testing.assert_close(pipe.null_pooled[Modality.TEXT], t2i["encode_prompt.negative_pooled_prompt_embeds"])
    png = (FIXTURE / "inputs" / "input_image.png").read_bytes()
    image_pooled = pipe.pooled[Modality.IMAGE].embed([png])
    torch.testing.assert_close(image_pooled[:, :8], i2t["image_encoder.0.out"], atol=1e-5, rtol=1e-4)
    vae = pipe.codecs[Modality.IMAGE]
    scale = vae.vae.config.scaling_factor
    torch.testing.assert_close(pipe.null_latents[Modality.IMAGE], i2t["vae_encode.1.mean"] * scale)
    pixels = InputPreparer(pipe.info["codecs"])(image=png)[Modality.IMAGE].value
    expected = load_file(FIXTURE / "preprocess.safetensors")["vae_pixel_values"]  # in [-1, 1]
    torch.testing.assert_close(torch.from_numpy(pixels) * 2 - 1, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(vae.encode(torch.from_numpy(pixels)[None]), i2t["vae_encode.0.mean"] * scale,
                               atol=1e-5, rtol=1e-4)
    audio = pipe.codecs[Modality.AUDIO]
    torch.testing.assert_close(pipe.null_latents[Modality.AUDIO],
                               a2t["audio_vae_encode.1.mean"] * audio.vae.config.scaling_factor)
    wave = InputPreparer(pipe.info["codecs"])(audio=(FIXTURE / "inputs" / "input_audio.wav").read_bytes())[Modality.AUDIO].value
    torch.testing.assert_close(audio.log_mel(torch.from_numpy(wave)[None])[:, 0],
                               load_file(FIXTURE / "preprocess.safetensors")["audio_vae_fbank"], atol=1e-4, rtol=0)


def test_every_task_of_the_release_runs(pipe):
    prepare = InputPreparer(pipe.info["codecs"])
    inputs = prepare(text=PROMPT, image=(FIXTURE / "inputs" / "input_image.png").read_bytes(),
                     audio=(FIXTURE / "inputs" / "input_audio.wav").read_bytes())
    params = SamplingParams(steps=2, guidance=4.0)
    for task in ("t2i", "i2t", "t2a", "a2t", "i2a", "a2i"):
        out = pipe.run([Prepared(task=task, inputs=inputs, params=params, seed=3)])[0]
        target = {"t": "text", "i": "image", "a": "audio"}[task[-1]]
        assert len(getattr(out, target)) == 1, task


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_serves_it_with_the_release_conventions(released_model, ray_cluster, tmp_path):
    from ray import serve

    from serve.app import build_app

    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": str(released_model)}), name="release", route_prefix="/")
        client = Client(f"http://127.0.0.1:{port}")
        (model,) = client.models()["models"]
        assert model["conventions"]["dropped_condition"] == "null"
        image = client.generate("t2i", text=PROMPT, steps=2, guidance=4.0, seed=1).image[0]
        assert image.startswith(b"\x89PNG")
        caption = client.generate("a2t", audio=(FIXTURE / "inputs" / "input_audio.wav").read_bytes(), steps=2,
                                  guidance=2.0, seed=1).text
        assert len(caption) == 1 and isinstance(caption[0], str)
    finally:
        serve.shutdown()


def test_a_directory_that_is_not_a_release_is_refused(tmp_path, capsys):
    assert convert(["release", str(COMPONENTS / "clip_l"), str(tmp_path / "out")]) == 2
    assert "not the root of an OmniFlow release" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert convert(["release", str(COMPONENTS / "release"), str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "file").read_text() == "x"


def test_every_run_of_the_release_pipeline_is_reproduced(capsys):
    """`check-pipeline-fixture`: the converted release, sampled from the draws the release's pipeline
    made, ends where that pipeline ended for t2i, i2t, t2a, a2t, i2a and a2i, with cfg_mode 'old' (the
    reference conventions) and 'new', latents and decoded media, to a relative 1e-4."""
    code = convert(["check-pipeline-fixture", str(FIXTURE)])
    errors = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {name.rsplit(".", 1)[0] for name in errors}
    assert runs == {f"{task}.{mode}" for task in ("t2i", "i2t", "t2a", "a2t", "i2a", "a2i") for mode in ("old", "new")}
    assert {"t2i.old.image", "t2a.old.log_mel", "a2i.new.image", "i2a.new.log_mel"} <= set(errors)
    assert all(error <= 1e-4 for error in errors.values()), errors
    assert code == 0
