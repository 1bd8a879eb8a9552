"""Model directories as users move and serve them: copied elsewhere without the codec builds they
came from, loaded with `OmniFlowPipeline.from_pretrained` (also from s3://), served with the real
`serve run serve/config.yaml`, and the RayService's Serve config checked by Serve's own schema
and builder."""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest
import requests
import torch
import yaml

from omniflow import storage as st
from omniflow.modality import Modality
from omniflow.model_dir import save_model_dir
from omniflow.pipeline import OmniFlowPipeline
from omniflow.presets import build_transformer
from omniflow.tasks import BUILTIN_TASKS
from serve.client import Client
from shapesworld import make_records
from shapesworld.toy.clip import toy_pooled_configs
from shapesworld.toy.codecs import toy_codec_configs

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"image": [4, 8, 8], "text": [8, 32], "audio": [4, 32, 16]}  # the toy codecs' latents


@pytest.fixture(scope="module")
def moved_model(tmp_path_factory, toy_codecs, toy_clip) -> Path:
    """A model directory written against codec and pooled-encoder builds that are then deleted,
    and copied elsewhere: what a user gets after `make demo` on one machine and a copy to another."""
    root = tmp_path_factory.mktemp("portable")
    build, clip_build = root / "toy-build", root / "toy-clip"
    shutil.copytree(toy_codecs[0], build)
    shutil.copytree(toy_clip[0], clip_build)
    torch.manual_seed(0)
    info = {"preset": "toy", "latent_shapes": SHAPES, "codecs": toy_codec_configs(build),
            "pooled": {m.value: c for m, c in toy_pooled_configs(clip_build).items()}}
    written = save_model_dir(build_transformer("toy"), root / "trained" / "model", extra=info)
    moved = root / "elsewhere" / "model"
    shutil.copytree(written, moved)
    for gone in (build, clip_build, written):
        shutil.rmtree(gone)
    return moved


def test_a_moved_directory_names_only_what_it_holds(moved_model):
    on_disk = json.loads((moved_model / "omniflow.json").read_text())
    assert {m: c["path"] for m, c in on_disk["codecs"].items()} == {
        "image": "image_codec", "audio": "audio_codec", "text": "text_codec"}
    assert {m: c["path"] for m, c in on_disk["pooled"].items()} == {
        "image": "image_pooled", "audio": "audio_pooled", "text": "text_pooled"}
    # an open_clip encoder brings its two files, not the rest of the build it came from
    assert sorted(p.name for p in (moved_model / "image_pooled").iterdir()) == [
        "open_clip_model.safetensors", "shapesworld-clip.json"]
    index = json.loads((moved_model / "model_index.json").read_text())
    assert index["_class_name"] == "OmniFlowPipeline"
    assert {k for k in index if not k.startswith("_")} == {
        "transformer", "image_codec", "audio_codec", "text_codec", "image_pooled", "audio_pooled", "text_pooled"}
    assert all((moved_model / name).is_dir() for name in index if not name.startswith("_"))


@pytest.fixture(scope="module")
def pipe(moved_model) -> OmniFlowPipeline:
    return OmniFlowPipeline.from_pretrained(moved_model)


def test_from_pretrained_generates_every_modality(pipe):
    record = make_records(1, seed=3)[0]
    assert sorted(pipe.tasks()) == sorted(BUILTIN_TASKS)
    assert [type(e).__name__ for e in (pipe.image_pooled, pipe.text_pooled, pipe.audio_pooled)] == [
        "OpenClipImagePooled", "OpenClipTextPooled", "MelVitAudioPooled"]
    image = pipe(task="t2i", text=record["caption"], num_inference_steps=2, seed=7, num_outputs=2).images
    assert len(image) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (32, 32) for i in image)
    again = pipe(task="t2i", text=record["caption"], num_inference_steps=2, seed=7).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(image[0]))  # output k is seeded seed + k
    caption = pipe(task="i2t", image=image[0], num_inference_steps=2, seed=1).texts
    assert len(caption) == 1 and isinstance(caption[0], str)
    out = pipe(task="at2i", audio=record["audio"], text=record["caption"], guidance_scale={"audio": 2.0, "text": 3.0},
               num_inference_steps=2, seed=1)
    assert len(out.images) == 1
    sound = pipe(task="t2a", text=record["caption"], num_inference_steps=2, seed=1)
    assert sound.sample_rate == 16_000 and sound.audios[0].dtype == np.float32 and sound.audios[0].ndim == 1
    with pytest.raises(ValueError, match="needs"):
        pipe(task="i2t", text="no image given")


def test_absent_modalities_follow_the_directory(moved_model, tmp_path):
    """A model trained with absent modalities skipped ("absent": "skip" in omniflow.json) samples
    without them; by default they are fed as noise at t = 1, as the reference does."""
    from omniflow.inference import AnyToAny, InputPreparer, Prepared, SamplingParams

    skipping = tmp_path / "skipping"
    shutil.copytree(moved_model, skipping)
    info = json.loads((skipping / "omniflow.json").read_text())
    (skipping / "omniflow.json").write_text(json.dumps({**info, "absent": "skip"}))
    for path, streams in ((moved_model, {"image", "text", "audio"}), (skipping, {"image", "text"})):
        runner = AnyToAny.load(path)
        seen = []
        runner.model.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(set(args[0])))
        inputs = InputPreparer(runner.info["codecs"])(text="a red circle")
        runner.run([Prepared(task="t2i", inputs=inputs, params=SamplingParams(steps=2))])
        assert seen == [streams] * 2, path


def test_reference_conventions_feed_null_inputs(moved_model, tmp_path):
    """With the released pipeline's conventions (`"conventions": {"profile": "reference"}`), a guidance
    branch that drops a condition feeds the latent of its null input at t = 0 with that input's pooled
    vector (zeros for images), and i2a feeds the empty caption's latent as its absent text at t = 1;
    an override when loading gives the same, and the project's conventions feed noise instead."""
    from omniflow.inference import AnyToAny, InputPreparer, Prepared, SamplingParams

    reference = tmp_path / "reference"
    shutil.copytree(moved_model, reference)
    info = json.loads((reference / "omniflow.json").read_text())
    # the toy's text pooled encoder is open_clip's, which gives no CLIP hidden states to put first
    released = {"profile": "reference", "text_condition": "latent"}
    (reference / "omniflow.json").write_text(json.dumps({**info, "conventions": released}))
    runner = AnyToAny.load(reference)
    calls = []

    def record(module, args):
        calls.append(args)

    runner.model.register_forward_pre_hook(record)
    prepare = InputPreparer(runner.info["codecs"])
    png = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    audio = runner.codecs[Modality.AUDIO]
    wav = audio.to_wav_bytes(0.3 * torch.sin(0.05 * torch.arange(audio.mel.num_samples)).unsqueeze(0))[0]
    inputs = prepare(text="a red circle", image=png.getvalue(), audio=wav)
    guided = SamplingParams(steps=1, guidance=3.0)
    outputs = ("t2i", "i2a", "a2t")
    for task in outputs:
        runner.run([Prepared(task=task, inputs=inputs, params=guided, seed=5)])
    null, null_pooled = runner.null_latents, runner.null_pooled
    assert set(null) == {Modality.TEXT, Modality.IMAGE, Modality.AUDIO} and set(null_pooled) == {Modality.TEXT, Modality.AUDIO}
    width = runner.model.config.pooled_projection_dim
    for (latents, times, vec), condition in zip(calls, (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)):
        m = condition.value
        assert torch.equal(latents[m][1], null[condition][0]) and times[m].tolist() == [0, 0]
        expected = torch.zeros(width) if condition == Modality.IMAGE else null_pooled[condition][0][:width]
        assert torch.equal(vec[1], expected) and vec[0].any()
    i2a_latents, i2a_times, _ = calls[1]
    assert torch.equal(i2a_latents["text"], null[Modality.TEXT].expand(2, -1, -1)) and i2a_times["text"].tolist() == [1, 1]
    # the empty caption, not the request's: i2a takes no text
    assert not torch.equal(null[Modality.TEXT], runner.codecs[Modality.TEXT].encode(["a red circle"]))

    # the transformer's output layers start at zero, so its inputs, not its outputs, tell conventions apart
    for conventions in (released, None):
        runner = AnyToAny.load(moved_model, conventions=conventions)
        seen = []
        runner.model.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args) and None)
        for task in outputs:
            runner.run([Prepared(task=task, inputs=inputs, params=guided, seed=5)])
        for (latents, times, vec), (ref_latents, ref_times, ref_vec), task in zip(seen, calls, outputs):
            same = all(torch.equal(latents[m], ref_latents[m]) and torch.equal(times[m], ref_times[m])
                       for m in ref_latents) and torch.equal(vec, ref_vec)
            assert same == (conventions is not None), (task, conventions)
    assert runner.null_latents == {} and runner.conventions.dropped_condition == "noise"


def test_conventions_are_checked(moved_model):
    from omniflow.conventions import PROFILES, resolve_conventions
    from omniflow.inference import AnyToAny

    assert resolve_conventions({"absent": "skip"}).absent == "skip"  # directories written before conventions
    both = resolve_conventions({"absent": "skip", "conventions": {"profile": "reference"}}, {"absent_text": "noise"})
    assert (both.absent, both.dropped_condition, both.absent_text, both.text_condition) == (
        "noise", "null", "noise", "clip_prefix")
    assert resolve_conventions({"conventions": {"profile": "reference", "absent": "skip"}}).absent == "skip"
    assert resolve_conventions({}, "reference") == PROFILES["reference"]
    with pytest.raises(ValueError, match="unknown conventions profile 'released'"):
        AnyToAny.load(moved_model, conventions="released")
    with pytest.raises(ValueError, match="clip_prefix' needs a clip-text-pooled text encoder"):
        AnyToAny.load(moved_model, conventions="reference")
    with pytest.raises(ValueError, match="dropped_condition"):
        resolve_conventions({"conventions": {"dropped_condition": "zeros"}})
    from serve.schema import ServeConfig

    assert ServeConfig(model="m", conventions={"dropped_condition": "noise"}).conventions == {"dropped_condition": "noise"}
    for bad in ("released", {"dropped_condition": "zeros"}):
        with pytest.raises(ValueError, match="conventions"):
            ServeConfig(model="m", conventions=bad)


def test_save_pretrained_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "again")
    copy = OmniFlowPipeline.from_pretrained(tmp_path / "again")
    a = pipe(task="t2i", text="a red circle", num_inference_steps=2, seed=4).images[0]
    b = copy(task="t2i", text="a red circle", num_inference_steps=2, seed=4).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_from_pretrained_reads_s3(moved_model, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/models/toy"
    st.upload_dir(moved_model, remote, s3_server.storage, last=["model_index.json"])
    pipe = OmniFlowPipeline.from_pretrained(remote, storage=s3_server.storage)
    assert pipe(task="t2i", text="a blue square", num_inference_steps=2, seed=2).images[0].size == (32, 32)


def test_the_service_serves_a_model_from_s3(moved_model, s3_server, ray_cluster):
    from ray import serve

    from serve.app import build_app

    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/models/served"
    st.upload_dir(moved_model, remote, s3_server.storage, last=["model_index.json"])
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": remote, "storage": s3_server.storage.model_dump(mode="json")}),
                  name="omniflow", route_prefix="/")
        result = Client(f"http://127.0.0.1:{port}").generate("t2i", text="a green triangle", steps=2, seed=3)
        assert len(result.image) == 1
    finally:
        serve.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_with_the_shipped_config(moved_model, tmp_path):
    """`serve run serve/config.yaml` from a directory whose runs/demo/model is the moved model; the
    only change to the shipped config is the port."""
    work = tmp_path / "work"
    shutil.copytree(moved_model, work / "runs" / "demo" / "model")
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert config["applications"][0]["args"]["model"] == "runs/demo/model"  # where `make demo` writes it
    port = _free_port()
    config["http_options"]["port"] = port
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (the server writes to it until the test stops it)
    process = subprocess.Popen([shutil.which("serve", path=os.path.dirname(sys.executable)), "run", "config.yaml"],
                               cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            pytest.fail("serve run did not become healthy:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        (model,) = requests.get(url + "/v1/models", timeout=30).json()["models"]
        assert sorted(model["tasks"]) == sorted(BUILTIN_TASKS)
        assert model["codecs"]["image"]["path"] == "image_codec"  # as the directory names it, no machine path
        record = make_records(1, seed=5)[0]
        client = Client(url)
        served = client.generate("t2i", text=record["caption"], steps=2, seed=9).image[0]
        local = OmniFlowPipeline.from_pretrained(moved_model)(task="t2i", text=record["caption"],
                                                               num_inference_steps=2, seed=9).images[0]
        assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(served)).convert("RGB")), np.asarray(local))
        inputs = {"text": record["caption"], "image": record["image"], "audio": record["audio"]}
        for task in sorted(BUILTIN_TASKS):
            given = {m.value: inputs[m.value] for m in BUILTIN_TASKS[task].conditions}
            result = client.generate(task, steps=2, seed=1, **given)
            for m in BUILTIN_TASKS[task].targets:
                assert len(getattr(result, m.value)) == 1, task
    finally:
        # Only this cluster's processes: `ray stop` would also end the session's cluster.
        ours = _processes_of(process.pid, ray_tmp)
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for p in ours:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        for p in psutil.wait_procs(ours, timeout=20)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _processes_of(pid: int, temp_dir: str) -> list[psutil.Process]:
    """`pid` with its descendants, and every process naming `temp_dir` (the cluster's daemons)."""
    found = {}
    roots = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    with contextlib.suppress(psutil.NoSuchProcess):
        roots.append(psutil.Process(pid))
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in (root, *root.children(recursive=True)):
                found.setdefault(p.pid, p)
    return [p for p in found.values() if p.pid != os.getpid()]


def test_the_rayservice_config_is_what_serve_accepts(moved_model):
    """The RayService's serveConfigV2 parses as Serve's deploy schema, and its import path builds
    through Serve's own builder call (the one `serve run` and `serve deploy` make)."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    shipped = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    for app in (*schema.applications, *shipped.applications):
        args = {**app.args, "model": str(moved_model)}  # the manifests name s3:// and runs/ paths
        args.pop("storage", None)
        built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), args)
        assert isinstance(built, Application)
