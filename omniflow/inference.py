"""Any-to-any generation from a model directory: media in, media out.

Two halves, so that a service can run them in different processes:

- `InputPreparer` needs only the codec configs of a model directory's `omniflow.json` (no
  weights). It turns a request's media into what the codecs take (pixels, fitted waveforms,
  captions) and raises `MediaError`, naming the input, for anything unusable.
- `AnyToAny` loads the transformer, the codecs and the pooled encoders. `run` takes prepared
  requests, samples every group of compatible ones (same task and sampling parameters) in one
  sampler call, and decodes the targets: captions as text, images as PNG, audio as WAV.

Output k of a request with seed s is drawn from its own generator seeded s + k, so it is the same
whatever else shares its batch.

    >>> pipe = AnyToAny.load("runs/demo/model")
    >>> prepare = InputPreparer(pipe.info["codecs"])
    >>> request = Prepared(task="t2i", inputs=prepare(text="a small red circle"), seed=7)
    >>> png = pipe.run([request])[0].image[0]
"""

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniflow.codecs.base import build_codec, codec_config
from omniflow.codecs.media import MAX_IMAGE_PIXELS, MediaError, decode_image, encode_image
from omniflow.modality import Modality
from omniflow.model_dir import load_model_dir, read_model_info
from omniflow.sampling import generate
from omniflow.tasks import BUILTIN_TASKS, Task, get_task

# A request's input field for each modality (text is a caption, image and audio are encoded media)
INPUT_FIELDS: dict[Modality, str] = {Modality.TEXT: "text", Modality.IMAGE: "image", Modality.AUDIO: "audio"}
MAX_TEXT_CHARS = 2000  # a caption longer than this is refused unread


class InputPreparer:
    """Request media -> codec inputs, from the codec configs alone (no weights are loaded).

    `codecs` is the `codecs` entry of a model directory's `omniflow.json` (modality -> codec config).
    Sizes are checked before anything reads an input: a text's length (`max_text_chars`), an
    image's width x height from its header (`max_image_pixels`), audio's header (see
    `omniflow.codecs.media.decode_audio`).
    """

    def __init__(self, codecs: Mapping[str, Mapping[str, Any]], *, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 max_text_chars: int = MAX_TEXT_CHARS):
        self.configs = {Modality(m): codec_config(c) for m, c in codecs.items()}
        self.max_image_pixels = max_image_pixels
        self.max_text_chars = max_text_chars

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(self.configs)

    def __call__(self, *, text: str | None = None, image: bytes | None = None,
                 audio: bytes | None = None) -> dict[Modality, Any]:
        """The given inputs as codec inputs: text -> str, image -> (3, R, R) float32 pixels in [0, 1],
        audio -> (samples,) float32 waveform at the codec's rate and length."""
        out: dict[Modality, Any] = {}
        for modality, value in ((Modality.TEXT, text), (Modality.IMAGE, image), (Modality.AUDIO, audio)):
            if value is None:
                continue
            if modality not in self.configs:
                raise MediaError(f"{modality.value}: this model has no {modality.value} codec")
            try:
                out[modality] = self._prepare(modality, value)
            except MediaError as err:
                raise MediaError(f"{modality.value}: {err}") from None
        return out

    def _prepare(self, modality: Modality, value: Any) -> Any:
        config = self.configs[modality]
        if modality == Modality.TEXT:
            if len(value) > self.max_text_chars:  # before strip() or a tokenizer reads it
                raise MediaError(f"text has {len(value):,} characters, above the limit of {self.max_text_chars:,}")
            try:
                value.encode("utf-8")  # JSON's \ud800 escapes give lone surrogates; tokenizers refuse them
            except UnicodeEncodeError as err:
                raise MediaError(f"text is not valid Unicode: a lone surrogate at character {err.start}") from None
            if not value.strip():
                raise MediaError("text is empty")
            return value
        if modality == Modality.IMAGE:
            from omniflow.codecs.image import to_pixels

            return to_pixels([decode_image(value, max_pixels=self.max_image_pixels)], config.resolution)[0].numpy()
        from omniflow.codecs.audio import prepare_waveform

        return prepare_waveform(value, config.mel, peak=config.peak)


@dataclass(frozen=True)
class SamplingParams:
    """How a request is sampled. Requests with equal parameters and task share a sampler call."""

    steps: int = 28
    shift: float | Mapping[str, float] = 3.0
    guidance: float | Mapping[str, float] = 1.0

    def key(self) -> str:
        return json.dumps({"steps": self.steps, "shift": self.shift, "guidance": self.guidance}, sort_keys=True)


@dataclass
class Prepared:
    """A request whose inputs went through `InputPreparer`."""

    task: str
    inputs: dict[Modality, Any]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    num_outputs: int = 1

    def batch_key(self) -> str:
        return f"{self.task}|{self.params.key()}"


@dataclass
class Outputs:
    """One request's outputs, `num_outputs` of each target modality, and where the time went."""

    seed: int
    text: list[str] | None = None
    image: list[bytes] | None = None  # PNG
    audio: list[bytes] | None = None  # WAV
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # samples in the sampler call that made these


class AnyToAny:
    """A model directory's transformer with its codecs and pooled encoders, ready to sample.

    A task's absent modalities are fed as noise at t = 1 (the reference's convention), or left out
    of the forward pass where `omniflow.json` says `"absent": "skip"` (a model trained that way).
    """

    def __init__(self, model: torch.nn.Module, codecs: Mapping[Modality, Any], pooled: Mapping[Modality, Any],
                 info: Mapping[str, Any]):
        self.model, self.codecs, self.pooled, self.info = model, dict(codecs), dict(pooled), dict(info)
        self.latent_shapes = {Modality(m): tuple(s) for m, s in info["latent_shapes"].items()}
        self.streams = tuple(Modality(m) for m in getattr(model, "streams", self.latent_shapes))

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> "AnyToAny":
        """Load the transformer (in `dtype`) and the codecs named in `omniflow.json` on `device`."""
        info = read_model_info(path)
        missing = [k for k in ("latent_shapes", "codecs") if k not in info]
        if missing:
            raise ValueError(f"{path}: omniflow.json lacks {missing}; export the model with `jobs.train` or `jobs.merge`")
        model = load_model_dir(path, dtype=dtype, device=device)

        def build(raw: Mapping[str, Any]) -> Any:
            return build_codec({**raw, "device": device})

        codecs = {Modality(m): build(c) for m, c in info["codecs"].items()}
        pooled = {Modality(m): build(c) for m, c in info.get("pooled", {}).items()}
        return cls(model, codecs, pooled, info)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tasks(self) -> list[str]:
        """The built-in tasks this model can run: each target and condition has a stream and a codec."""
        return [name for name, task in BUILTIN_TASKS.items() if not self.unsupported(task)]

    def unsupported(self, task: str | Task) -> str | None:
        """Why this model cannot run `task`, or None."""
        task = get_task(task)
        for m in (*task.targets, *task.conditions):
            if m not in self.streams:
                return f"the model has no {m.value} stream (it has {[s.value for s in self.streams]})"
            if m not in self.codecs:
                return f"the model directory names no {m.value} codec"
        return None

    @torch.inference_mode()
    def run(self, requests: Sequence[Prepared], *, decode_alone: bool = True) -> list[Outputs]:
        """Outputs for each request, in order; each group of compatible requests is one sampler call.

        `decode_alone` decodes each sample by itself, so that its bytes never depend on its batch
        (codecs' batched kernels differ in the last bits, and Griffin-Lim amplifies that); False
        decodes a group at once, faster where byte-identity does not matter (evaluation)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(i)
        results: list[Outputs | None] = [None] * len(requests)
        for members in groups.values():
            for i, out in zip(members, self._run_group([requests[i] for i in members], decode_alone)):
                results[i] = out
        return results

    def _run_group(self, requests: Sequence[Prepared], decode_alone: bool) -> list[Outputs]:
        task = get_task(requests[0].task)
        why = self.unsupported(task)
        if why:
            raise ValueError(f"task {task.name!r}: {why}")
        params = requests[0].params
        # one sample per output; output k of a request is seeded seed + k
        owners = [(r, k) for r, req in enumerate(requests) for k in range(req.num_outputs)]
        timings = {}
        start = time.perf_counter()
        conditions, pooled = self._encode(task, [requests[r].inputs for r, _ in owners])
        timings["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(requests[r].seed + k) for r, k in owners]
        latents = generate(
            self.model, task, conditions=conditions, pooled=pooled, batch_size=len(owners),
            target_shapes={m.value: self.latent_shapes[m] for m in task.targets},
            absent_shapes={m.value: self.latent_shapes[m] for m in task.absent if m in self.streams}
            if self.info.get("absent", "noise") == "noise" else None,
            steps=params.steps, shift=params.shift, guidance=params.guidance, generator=generators,
        )
        timings["sample_s"] = time.perf_counter() - start
        start = time.perf_counter()
        decoded = {m: self._decode(m, latents[m], decode_alone) for m in task.targets}
        timings["decode_s"] = time.perf_counter() - start
        timings = {k: round(v, 4) for k, v in timings.items()}
        outputs = []
        for r, request in enumerate(requests):
            rows = [i for i, (owner, _) in enumerate(owners) if owner == r]
            out = Outputs(seed=request.seed, timings=dict(timings), batch_size=len(owners))
            for m, values in decoded.items():
                setattr(out, INPUT_FIELDS[m], [values[i] for i in rows])
            outputs.append(out)
        return outputs

    def _encode(self, task: Task, inputs: Sequence[Mapping[Modality, Any]]) -> tuple[dict, dict]:
        """(condition latents, pooled vectors) for each sample's inputs."""
        conditions, pooled = {}, {}
        for m in task.conditions:
            values = [i[m] for i in inputs]
            if m == Modality.TEXT:
                media: Any = values
            else:
                media = torch.from_numpy(np.stack(values))
            conditions[m.value] = self.codecs[m].encode(media)
            if m in self.pooled:
                from omniflow.codecs.pooled import pooled_inputs

                rate = self.codecs[Modality.AUDIO].sample_rate if m == Modality.AUDIO else None
                pooled[m.value] = self.pooled[m].embed(pooled_inputs(m, media, rate))
        return conditions, pooled

    def _decode(self, modality: Modality, latents: torch.Tensor, alone: bool) -> list:
        codec = self.codecs[modality]
        out = []
        for one in latents.split(1 if alone else len(latents)):
            if modality == Modality.TEXT:
                out += codec.decode(one)
            elif modality == Modality.IMAGE:
                out += [encode_image(image) for image in codec.to_uint8(codec.decode(one))]
            else:
                out += codec.to_wav_bytes(codec.decode(one))
        return out
