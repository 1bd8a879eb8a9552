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
from omniflow.conventions import Conventions, clip_prefixed, resolve_conventions
from omniflow.modality import Modality
from omniflow.model_dir import load_model_dir, read_model_info
from omniflow.sampling import generate
from omniflow.tasks import BUILTIN_TASKS, Task, get_task

# A request's input field for each modality (text is a caption, image and audio are encoded media)
INPUT_FIELDS: dict[Modality, str] = {Modality.TEXT: "text", Modality.IMAGE: "image", Modality.AUDIO: "audio"}
MAX_TEXT_CHARS = 2000  # a caption longer than this is refused unread


@dataclass(frozen=True)
class Media:
    """A prepared image or audio input: `value`, what its codec takes, and `original`, the bytes it
    came from (which pooled encoders read under `pooled_input: original`)."""

    value: np.ndarray
    original: bytes


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
        """The given inputs as codec inputs: text -> str, image -> `Media` of (3, R, R) float32 pixels
        in [0, 1], audio -> `Media` of a (samples,) float32 waveform at the codec's rate and length."""
        out: dict[Modality, Any] = {}
        for modality, value in ((Modality.TEXT, text), (Modality.IMAGE, image), (Modality.AUDIO, audio)):
            if value is None:
                continue
            if modality not in self.configs:
                raise MediaError(f"{modality.value}: this model has no {modality.value} codec")
            try:
                prepared = self._prepare(modality, value)
                out[modality] = prepared if modality == Modality.TEXT else Media(prepared, bytes(value))
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

            image = decode_image(value, max_pixels=self.max_image_pixels)
            return to_pixels([image], config.resolution, resize=config.resize)[0].numpy()
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

    What a task or a guidance branch leaves out is fed as the directory's sampling conventions say
    (`omniflow.conventions`: its `omniflow.json`, then `conventions`, a profile name or fields).
    The null inputs those conventions may need are encoded once, here, so that a model whose codecs
    lack one fails on loading rather than on a request.
    """

    def __init__(self, model: torch.nn.Module, codecs: Mapping[Modality, Any], pooled: Mapping[Modality, Any],
                 info: Mapping[str, Any], *, conventions: str | Mapping[str, Any] | None = None):
        self.model, self.codecs, self.pooled, self.info = model, dict(codecs), dict(pooled), dict(info)
        self.latent_shapes = {Modality(m): tuple(s) for m, s in info["latent_shapes"].items()}
        self.streams = tuple(Modality(m) for m in getattr(model, "streams", self.latent_shapes))
        self.conventions: Conventions = resolve_conventions(info, conventions)
        if self.conventions.text_condition == "clip_prefix" and not hasattr(self.pooled.get(Modality.TEXT), "encode"):
            kinds = {m.value: e.config.kind for m, e in self.pooled.items()}
            raise ValueError(f"text_condition 'clip_prefix' needs a clip-text-pooled text encoder (its CLIP hidden "
                             f"states); this model's pooled encoders are {kinds}")
        self.null_latents, self.null_pooled, self.null_text_condition = self._null_inputs()

    def _null_inputs(self) -> tuple[dict[Modality, torch.Tensor], dict[Modality, torch.Tensor], torch.Tensor | None]:
        """(latents, pooled vectors) of each modality's null input where the conventions use them,
        and the text stream of the empty caption as a condition."""
        latents, pooled = {}, {}
        wanted = set(self.codecs) if self.conventions.dropped_condition == "null" else set()
        if self.conventions.absent_text == "null" and Modality.TEXT in self.codecs:
            wanted.add(Modality.TEXT)
        for m in sorted(wanted & set(self.streams), key=list(Modality).index):
            latents[m] = self.codecs[m].null_latents()
            if self.conventions.dropped_condition == "null" and m in self.pooled and m != Modality.IMAGE:
                pooled[m] = self.pooled[m].null()  # the released pipeline zeroes an image's vector
        text_condition = None
        if Modality.TEXT in latents and self.conventions.dropped_condition == "null":
            empty = latents[Modality.TEXT]
            prefixed = self.conventions.text_condition == "clip_prefix"
            text_condition = self._text_condition([""], empty)[0] if prefixed else empty
        return latents, pooled, text_condition

    def _text_condition(self, texts: Sequence[str], latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the text stream of captions that condition, their pooled vectors or None), as
        `text_condition` says."""
        encoder = self.pooled.get(Modality.TEXT)
        if self.conventions.text_condition == "latent":
            return latents, encoder.embed(texts) if encoder is not None else None
        pooled, hidden = encoder.encode(texts)
        return clip_prefixed(hidden, latents, self.model.config.joint_attention_dim), pooled

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32",
             conventions: str | Mapping[str, Any] | None = None) -> "AnyToAny":
        """Load the transformer (in `dtype`) and the codecs named in `omniflow.json` on `device`;
        `conventions` overrides the directory's sampling conventions."""
        info = read_model_info(path)
        missing = [k for k in ("latent_shapes", "codecs") if k not in info]
        if missing:
            raise ValueError(f"{path}: omniflow.json lacks {missing}; export the model with `jobs.train` or `jobs.merge`")
        model = load_model_dir(path, dtype=dtype, device=device)

        def build(raw: Mapping[str, Any]) -> Any:
            return build_codec({**raw, "device": device})

        codecs = {Modality(m): build(c) for m, c in info["codecs"].items()}
        pooled = {Modality(m): build(c) for m, c in info.get("pooled", {}).items()}
        return cls(model, codecs, pooled, info, conventions=conventions)

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
        conditions, pooled = self.encode_conditions(task, [requests[r].inputs for r, _ in owners])
        timings["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        generators = [torch.Generator("cpu").manual_seed(requests[r].seed + k) for r, k in owners]
        latents = generate(
            self.model, task, conditions=conditions, pooled=pooled, batch_size=len(owners),
            target_shapes={m.value: self.latent_shapes[m] for m in task.targets},
            steps=params.steps, shift=params.shift, guidance=params.guidance, generator=generators,
            **self.left_out(task),
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

    def left_out(self, task: Task) -> dict[str, Any]:
        """`generate`'s arguments for what `task` and its guidance branches leave out."""
        conventions, null = self.conventions, self.null_latents
        absent = [m for m in task.absent if m in self.streams]
        args: dict[str, Any] = {
            "absent_shapes": {m.value: self.latent_shapes[m] for m in absent} if conventions.absent == "noise" else None,
        }
        if conventions.absent_text == "null" and Modality.TEXT in absent:
            args["absent_latents"] = {Modality.TEXT.value: null[Modality.TEXT]}
        if conventions.dropped_condition == "null":
            args["unconditional"] = {m.value: null[m] for m in task.conditions}
            if Modality.TEXT in task.conditions:
                args["unconditional"][Modality.TEXT.value] = self.null_text_condition
            args["null_pooled"] = {m.value: self.null_pooled[m] for m in task.conditions if m in self.null_pooled}
        return args

    def encode_conditions(self, task: Task, inputs: Sequence[Mapping[Modality, Any]]) -> tuple[dict, dict]:
        """(condition latents, pooled vectors) for each sample's inputs."""
        conditions, pooled = {}, {}
        for m in task.conditions:
            values = [i[m] for i in inputs]
            if m == Modality.TEXT:
                media: Any = values
            else:
                media = torch.from_numpy(np.stack([v.value for v in values]))
            conditions[m.value] = self.codecs[m].encode(media)
            if m == Modality.TEXT:
                conditions[m.value], vector = self._text_condition(media, conditions[m.value])
                if vector is not None:
                    pooled[m.value] = vector
            elif m in self.pooled:
                from omniflow.codecs.pooled import pooled_inputs

                if self.conventions.pooled_input == "original":
                    source = [v.original for v in values]
                else:
                    source = pooled_inputs(m, media, self.codecs[m].sample_rate if m == Modality.AUDIO else None)
                pooled[m.value] = self.pooled[m].embed(source)
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
