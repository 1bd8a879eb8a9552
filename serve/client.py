"""A client for the any-to-any service, as a library and a command.

    python -m serve.client t2i --text "a small red circle at the top left" --out outputs/
    python -m serve.client i2t --image cat.png
    python -m serve.client at2i --audio tone.wav --text "a blue square" --guidance audio=2,text=4 --num-outputs 4
    python -m serve.client models

Outputs are written as <out>/<task>-<seed>-<k>.png / .wav / .txt and their paths printed; captions
are printed too. Exit status 0 on success, 1 when the service answers with an error (printed).

    >>> client = Client("http://127.0.0.1:8000")
    >>> result = client.generate("t2i", text="a small red circle", seed=7)
    >>> result.image[0][:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("t2i", "i2t", "t2a", "a2t", "i2a", "a2i", "at2i", "it2a", "ai2t", "joint")
EXTENSIONS = {"image": "png", "audio": "wav", "text": "txt"}


class ServiceError(RuntimeError):
    """The service answered with an error status; the message is its explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass
class Generated:
    """One response: decoded outputs per target modality, the seed and the service's timings."""

    task: str
    seed: int
    text: list[str] | None = None
    image: list[bytes] | None = None  # PNG
    audio: list[bytes] | None = None  # WAV
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 600.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw).get("error", raw.decode(errors="replace"))
            except (json.JSONDecodeError, AttributeError):
                message = raw.decode(errors="replace")
            raise ServiceError(err.code, message) from None

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def models(self) -> dict:
        return self._call("GET", "/v1/models")

    def generate(self, task: str, *, text: str | None = None, image: bytes | None = None, audio: bytes | None = None,
                 **params: Any) -> Generated:
        """Run `task`; `params` are `steps`, `shift`, `guidance`, `seed`, `num_outputs`."""
        body = {"task": task, **{k: v for k, v in params.items() if v is not None}}
        if text is not None:
            body["text"] = text
        for name, data in (("image", image), ("audio", audio)):
            if data is not None:
                body[name] = base64.b64encode(data).decode()
        answer = self._call("POST", "/v1/generate", json.dumps(body).encode(), "application/json")
        decoded = {m: [base64.b64decode(x) for x in answer[m]] if answer.get(m) is not None else None
                   for m in ("image", "audio")}
        return Generated(task=answer["task"], seed=answer["seed"], text=answer.get("text"), timings=answer["timings"],
                         batch_size=answer["batch_size"], **decoded)


def write_outputs(result: Generated, out: Path) -> list[Path]:
    """Each output as <out>/<task>-<seed>-<k>.<ext>; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for modality, ext in EXTENSIONS.items():
        for k, value in enumerate(getattr(result, modality) or []):
            path = out / f"{result.task}-{result.seed}-{k}.{ext}"
            path.write_bytes(value.encode() + b"\n" if isinstance(value, str) else value)
            paths.append(path)
    return paths


def _weights(value: str) -> float | dict[str, float]:
    """"4" -> 4.0; "image=2,text=4" -> {"image": 2.0, "text": 4.0}."""
    if "=" not in value:
        return float(value)
    pairs = (item.split("=", 1) for item in value.split(","))
    return {k.strip(): float(v) for k, v in pairs}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=(*TASKS, "models", "health"), help="a task, or `models` / `health`")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--text", help="input caption")
    p.add_argument("--image", type=Path, help="input image file (PNG / JPEG)")
    p.add_argument("--audio", type=Path, help="input audio file (WAV / FLAC)")
    p.add_argument("--steps", type=int)
    p.add_argument("--shift", type=_weights, help="one value, or per target: image=3,audio=3")
    p.add_argument("--guidance", type=_weights, help="one CFG weight, or per condition: audio=2,text=4")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-outputs", type=int)
    p.add_argument("--out", type=Path, default=Path("outputs"), help="directory for the outputs (default: outputs)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    client = Client(args.url, timeout=args.timeout)
    try:
        media = {name: path.read_bytes() for name, path in (("image", args.image), ("audio", args.audio)) if path}
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.task in ("models", "health"):
            print(json.dumps(client.models() if args.task == "models" else client.health(), indent=2))
            return 0
        result = client.generate(args.task, text=args.text, steps=args.steps, shift=args.shift, guidance=args.guidance,
                                 seed=args.seed, num_outputs=args.num_outputs, **media)
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError) as err:
        print(f"error: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    for caption in result.text or []:
        print(f"text: {caption}")
    for path in write_outputs(result, args.out):
        print(path)
    print(f"seed {result.seed}, {result.timings.get('total_s', 0):.2f} s (batch of {result.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
