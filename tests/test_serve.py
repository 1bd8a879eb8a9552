"""The any-to-any service on a local Ray cluster, called over real HTTP on 127.0.0.1.

The model directory is exported from a training checkpoint (the path `jobs.train` takes) of a
random `toy` transformer with the toy codecs, so every task runs on the codecs users get.
"""

import base64
import io
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
import yaml
from PIL import Image

from omniflow.codecs.media import encode_audio
from omniflow.tasks import BUILTIN_TASKS
from serve.client import Client, ServiceError
from shapesworld import make_records

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 400_000
RESOLUTION, SAMPLE_RATE, SAMPLES = 32, 16_000, 128 * 160  # the toy codecs' image side and audio clip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(toy_model_dir) -> Path:
    return toy_model_dir


@pytest.fixture(scope="module")
def service(model_dir, ray_cluster) -> str:
    """The application on the session's Ray cluster; its URL. A long batch wait makes concurrent
    requests share batches."""
    from ray import serve

    from serve.app import build_app

    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"model": str(model_dir), "max_batch_size": 8, "batch_wait_timeout_s": 0.3,
                     "limits": {"max_body_bytes": MAX_BODY, "max_steps": 50, "max_outputs": 4}})
    serve.run(app, name="omniflow", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def media() -> dict:
    record = make_records(1, seed=11)[0]
    return {"text": record["caption"], "image": record["image"], "audio": record["audio"]}


def _inputs(task: str, media: dict) -> dict:
    return {m.value: media[m.value] for m in BUILTIN_TASKS[task].conditions}


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/generate", data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("task", sorted(BUILTIN_TASKS))
def test_every_task_answers_with_decodable_outputs(service, media, task):
    result = Client(service).generate(task, steps=3, seed=5, num_outputs=2, **_inputs(task, media))
    targets = {m.value for m in BUILTIN_TASKS[task].targets}
    assert result.task == task and result.seed == 5
    for modality in ("text", "image", "audio"):
        outputs = getattr(result, modality)
        assert (outputs is not None) == (modality in targets), modality
    for png in result.image or []:
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (RESOLUTION, RESOLUTION, 3)
    for wav in result.audio or []:
        wave, rate = soundfile.read(io.BytesIO(wav))
        assert rate == SAMPLE_RATE and wave.shape == (SAMPLES,)
    for caption in result.text or []:
        assert isinstance(caption, str)
    assert len(next(getattr(result, m) for m in targets)) == 2
    assert {"encode_s", "sample_s", "decode_s", "total_s"} <= set(result.timings)


def test_same_seed_same_bytes_and_outputs_differ_by_seed(service, media):
    client = Client(service)
    first = client.generate("t2i", text=media["text"], steps=3, seed=21, num_outputs=2)
    again = client.generate("t2i", text=media["text"], steps=3, seed=21, num_outputs=2)
    assert first.image == again.image
    assert first.image[0] != first.image[1]  # output k is seeded seed + k
    shifted = client.generate("t2i", text=media["text"], steps=3, seed=22)
    assert shifted.image[0] == first.image[1]


@pytest.mark.parametrize("task, guidance", [("t2i", 3.0), ("at2i", {"audio": 2.0, "text": 4.0}), ("it2a", 2.5)])
def test_batched_requests_equal_unbatched_ones(service, media, task, guidance):
    client = Client(service)
    seeds = list(range(100, 106))

    def call(seed: int):
        return client.generate(task, steps=3, seed=seed, guidance=guidance, **_inputs(task, media))

    with ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(call, seeds))
    assert max(r.batch_size for r in together) > 1  # at least some shared a sampler call
    for seed, batched in zip(seeds, together):
        alone = call(seed)
        assert alone.batch_size == 1
        assert (alone.image, alone.audio, alone.text) == (batched.image, batched.audio, batched.text), seed


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bad_requests(media: dict) -> list[tuple[str, bytes, int, str]]:
    """(case, body, expected status, words the error message must contain)."""
    silent = encode_audio(np.zeros(16_000, np.float32), 16_000)
    huge_png = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(huge_png, format="PNG")  # 20 MP, above the default 16 MP limit
    cases = [
        ("unknown task", {"task": "t2v", "text": "a"}, 422, "task"),
        ("missing input", {"task": "t2i"}, 422, "needs input"),
        ("input the task does not take", {"task": "t2i", "text": "a", "audio": _b64(media["audio"])}, 422, "remove"),
        ("image not base64", {"task": "i2t", "image": "not base64!"}, 422, "base64"),
        ("image not an image", {"task": "i2t", "image": _b64(b"GIF89a garbage")}, 422, "image"),
        ("image too large", {"task": "i2t", "image": _b64(huge_png.getvalue())}, 422, "pixel"),
        ("empty image", {"task": "i2t", "image": ""}, 422, "empty"),
        ("audio not audio", {"task": "a2t", "audio": _b64(b"RIFF1234WAVEjunk")}, 422, "audio"),
        ("silent audio", {"task": "a2t", "audio": _b64(silent)}, 422, "silent"),
        ("empty text", {"task": "t2i", "text": "   "}, 422, "empty"),
        ("text too long", {"task": "t2i", "text": "a" * 5000}, 422, "characters"),
        ("steps zero", {"task": "t2i", "text": "a", "steps": 0}, 422, "steps"),
        ("steps above limit", {"task": "t2i", "text": "a", "steps": 51}, 422, "limit of 50"),
        ("too many outputs", {"task": "t2i", "text": "a", "num_outputs": 5}, 422, "limit of 4"),
        ("negative seed", {"task": "t2i", "text": "a", "seed": -1}, 422, "seed"),
        ("guidance for a non-condition", {"task": "t2i", "text": "a", "guidance": {"audio": 2}}, 422, "guidance"),
        ("guidance out of range", {"task": "t2i", "text": "a", "guidance": 1000}, 422, "guidance"),
        ("shift for a non-target", {"task": "t2i", "text": "a", "shift": {"audio": 2}}, 422, "shift"),
        ("steps of the wrong type", {"task": "t2i", "text": "a", "steps": "many"}, 422, "steps"),
        ("unknown field", {"task": "t2i", "text": "a", "cfg": 3}, 422, "cfg"),
    ]
    out = [(case, json.dumps(body).encode(), status, words) for case, body, status, words in cases]
    out += [
        ("not JSON", b"{task: t2i", 400, "JSON"),
        ("JSON but not an object", b"[1, 2]", 400, "object"),
        ("oversized payload", json.dumps({"task": "i2t", "image": "A" * MAX_BODY}).encode(), 413, "limit"),
    ]
    return out


def test_bad_requests_get_4xx_that_say_what_to_fix(service, media):
    for case, body, status, words in _bad_requests(media):
        got, answer = _post(service, body)
        assert got == status, (case, got, answer)
        assert words.lower() in answer["error"].lower(), (case, answer)
        assert "Traceback" not in answer["error"] and 'File "' not in answer["error"], case
    got, answer = _post(service, b"task=t2i", "application/x-www-form-urlencoded")
    assert got == 415 and "application/json" in answer["error"]


def test_a_burst_of_malformed_requests_leaves_the_service_healthy(service, media):
    bodies = [body for _, body, _, _ in _bad_requests(media)] * 3
    with ThreadPoolExecutor(8) as pool:
        statuses = [status for status, _ in pool.map(lambda b: _post(service, b), bodies)]
    assert all(400 <= s < 500 for s in statuses)
    client = Client(service)
    assert client.health() == {"status": "ok"}
    assert client.generate("i2t", image=media["image"], steps=2, seed=1).text


def test_multipart_upload_matches_base64(service, media):
    fields = {"request": json.dumps({"task": "at2i", "text": media["text"], "steps": 3, "seed": 9})}
    answer = requests.post(service + "/v1/generate", data=fields,
                           files={"audio": ("clip.wav", media["audio"], "audio/wav")}, timeout=120)
    assert answer.status_code == 200, answer.text
    via_json = Client(service).generate("at2i", text=media["text"], audio=media["audio"], steps=3, seed=9)
    assert base64.b64decode(answer.json()["image"][0]) == via_json.image[0]
    both = requests.post(service + "/v1/generate", timeout=60, files={"image": ("x.png", media["image"])},
                         data={"request": json.dumps({"task": "i2t", "image": _b64(media["image"])})})
    assert both.status_code == 400 and "once" in both.json()["error"]


def test_models_health_and_openapi(service, model_dir):
    client = Client(service)
    assert client.health() == {"status": "ok"}
    (model,) = client.models()["models"]
    assert set(model["tasks"]) == set(BUILTIN_TASKS) and model["path"] == str(model_dir)
    assert model["latent_shapes"]["image"] == [4, 8, 8] and model["limits"]["max_steps"] == 50
    schema = requests.get(service + "/openapi.json", timeout=30).json()
    operation = schema["paths"]["/v1/generate"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(operation["requestBody"]["content"])
    assert "GenerateRequest" in schema["components"]["schemas"] and "GenerateResponse" in schema["components"]["schemas"]


def test_client_cli_writes_outputs(service, media, tmp_path):
    image = tmp_path / "in.png"
    image.write_bytes(media["image"])
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "serve.client", "it2a", "--url", service, "--image", str(image),
                          "--text", media["text"], "--steps", "2", "--seed", "3", "--num-outputs", "2",
                          "--guidance", "image=2,text=3", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["it2a-3-0.wav", "it2a-3-1.wav"] and str(out / written[0]) in run.stdout
    bad = subprocess.run([sys.executable, "-m", "serve.client", "i2t", "--url", service, "--steps", "2"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and "needs input" in bad.stderr
    with pytest.raises(ServiceError) as err:
        Client(service).generate("t2i", text="a", steps=500)
    assert err.value.status == 422


def test_config_file_and_local_command(model_dir):
    from ray.serve import Application

    from serve.app import build_app

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "serve.app:build_app"
    assert {d["name"] for d in application["deployments"]} == {"Generator", "Frontend"}
    assert config["http_options"]["host"] == "127.0.0.1"
    assert isinstance(build_app({**application["args"], "model": str(model_dir)}), Application)
    with pytest.raises(ValueError, match="omniflow.json"):
        build_app({"model": str(model_dir.parent)})

    bad = subprocess.run([sys.executable, "-m", "serve", "--model", str(model_dir.parent / "nowhere")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "omniflow.json" in bad.stderr


def test_hostile_inputs_get_a_quick_4xx_and_leave_the_service_healthy(service, media):
    import time

    from hostile_media import png_claiming, wav_claiming

    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    cases = [
        ("1 MB caption", {"task": "t2i", "text": "a" * 2**20}, 413),  # over the body limit
        ("caption under the body limit", {"task": "t2i", "text": "\u0301" * (MAX_BODY // 8)}, 422),
        ("lone surrogate", {"task": "t2i", "text": "red \ud800 circle"}, 422),
        ("random bytes image", {"task": "i2t", "image": _b64(noise)}, 422),
        ("random bytes after a PNG signature", {"task": "i2t", "image": _b64(b"\x89PNG\r\n\x1a\n" + noise)}, 422),
        ("PNG claiming 100000x100000", {"task": "i2t", "image": _b64(png_claiming(100_000, 100_000))}, 422),
        ("WAV claiming 2^31 Hz", {"task": "a2t", "audio": _b64(wav_claiming(frames=100, sample_rate=2**31 - 1))}, 422),
    ]
    for case, body, status in cases:
        start = time.perf_counter()
        got, answer = _post(service, json.dumps(body).encode())
        assert (got, time.perf_counter() - start < 5) == (status, True), (case, got, answer)
    client = Client(service)
    assert client.health() == {"status": "ok"}
    assert client.generate("t2i", text=media["text"], steps=2, seed=1).image
