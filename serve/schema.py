"""The HTTP API's request and response bodies, the service's limits and its settings.

Field constraints that do not depend on settings live on the models (pydantic answers them with
422); those that do (`Limits`) are checked by `check_request`, which says which limit was hit and
how to change it.
"""

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from omniflow.conventions import conventions_from
from omniflow.modality import MODALITIES
from omniflow.storage import StorageConfig
from omniflow.tasks import BUILTIN_TASKS, get_task

TaskName = Literal[tuple(BUILTIN_TASKS)]  # t2i, i2t, t2a, a2t, i2a, a2i, at2i, it2a, ai2t, joint
ModalityName = Literal[tuple(m.value for m in MODALITIES)]  # image, text, audio
MAX_SEED = 2**62  # output k of a request is seeded seed + k; this leaves room for any k


class Limits(BaseModel):
    """What one request may ask for. Anything beyond gets a 4xx saying which limit it hit."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(16 * 2**20, gt=0, description="whole request body (JSON or multipart)")
    max_text_chars: int = Field(2000, gt=0)
    max_image_pixels: int = Field(16_000_000, gt=0, description="width x height of an input image")
    max_steps: int = Field(100, gt=0)
    max_outputs: int = Field(8, gt=0, description="num_outputs per request")
    max_guidance: float = Field(30.0, gt=0)
    max_shift: float = Field(20.0, gt=0)


class GenerateRequest(BaseModel):
    """`POST /v1/generate`. Give the task's inputs (and only those): `text` a caption, `image` a
    base64 PNG / JPEG, `audio` a base64 WAV / FLAC (or upload them as multipart files)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"task": "t2i", "text": "a small red circle at the top left", "steps": 28, "guidance": 4.0,
                      "seed": 7}],
    })
    task: TaskName = Field(description="what to generate from what: t2i = text to image, at2i = audio + text to image, ...")
    text: str | None = Field(None, description="input caption")
    image: str | None = Field(None, description="input image, base64 PNG or JPEG")
    audio: str | None = Field(None, description="input audio, base64 WAV or FLAC")
    steps: int = Field(28, ge=1, description="Euler steps")
    shift: float | dict[ModalityName, float] = Field(
        3.0, description="SD3 schedule shift, one value or one per target modality")
    guidance: float | dict[ModalityName, float] = Field(
        1.0, description="classifier-free guidance weight, or one weight per conditioning modality "
                         "(the multi-modal rule); 1 means no guidance")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="random when not given; returned in the response")
    num_outputs: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _inputs_fit_task(self) -> "GenerateRequest":
        task = get_task(self.task)
        needed = {m.value for m in task.conditions}
        given = {name for name in ("text", "image", "audio") if getattr(self, name) is not None}
        if needed - given:
            raise ValueError(f"task {self.task} needs input(s) {sorted(needed - given)}")
        if given - needed:
            raise ValueError(f"task {self.task} takes only {sorted(needed) or 'no inputs'}; remove {sorted(given - needed)}")
        if isinstance(self.guidance, dict) and set(self.guidance) - needed:
            raise ValueError(f"guidance weights are per conditioning modality of {self.task} ({sorted(needed)}); "
                             f"remove {sorted(set(self.guidance) - needed)}")
        targets = {m.value for m in task.targets}
        if isinstance(self.shift, dict) and set(self.shift) - targets:
            raise ValueError(f"shift is per target modality of {self.task} ({sorted(targets)}); "
                             f"remove {sorted(set(self.shift) - targets)}")
        return self

    def with_seed(self) -> "GenerateRequest":
        return self if self.seed is not None else self.model_copy(update={"seed": random.randrange(2**31)})


def check_request(request: GenerateRequest, limits: Limits) -> None:
    """Raise ValueError naming the first limit `request` exceeds."""
    def values(x: float | dict) -> list[float]:
        return list(x.values()) if isinstance(x, dict) else [x]

    # the text first: nothing should read a text over the limit
    if request.text is not None and len(request.text) > limits.max_text_chars:
        raise ValueError(f"text has {len(request.text):,} characters, above the limit of {limits.max_text_chars:,}")
    if request.steps > limits.max_steps:
        raise ValueError(f"steps={request.steps} is above this service's limit of {limits.max_steps}")
    if request.num_outputs > limits.max_outputs:
        raise ValueError(f"num_outputs={request.num_outputs} is above this service's limit of {limits.max_outputs}")
    if any(not 0 <= g <= limits.max_guidance for g in values(request.guidance)):
        raise ValueError(f"guidance must be in [0, {limits.max_guidance:g}], got {request.guidance}")
    if any(not 0 < s <= limits.max_shift for s in values(request.shift)):
        raise ValueError(f"shift must be in (0, {limits.max_shift:g}], got {request.shift}")


class GenerateResponse(BaseModel):
    """The outputs of the task's target modalities, `num_outputs` each (output k was seeded seed + k)."""

    task: TaskName
    seed: int
    text: list[str] | None = Field(None, description="generated captions")
    image: list[str] | None = Field(None, description="generated images, base64 PNG")
    audio: list[str] | None = Field(None, description="generated audio, base64 WAV")
    timings: dict[str, float] = Field(description="seconds: queue, encode, sample, decode, total")
    batch_size: int = Field(description="samples in the sampler call that served this request")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong with the request and how to fix it")


class ServeConfig(BaseModel):
    """The application's settings: `args` of `serve/config.yaml`, or `python -m serve` options."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model directory (local or s3://) exported by jobs.train or jobs.merge")
    device: str = Field("auto", description="auto (CUDA when the replica has a GPU), cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    conventions: str | dict[str, str] | None = Field(
        None, description="sampling conventions over the model directory's: a profile (project, or reference, the "
        "released OmniFlow pipeline's) or fields, e.g. {dropped_condition: noise} (omniflow.conventions)")

    @field_validator("conventions")
    @classmethod
    def _known_conventions(cls, value: str | dict[str, str] | None) -> str | dict[str, str] | None:
        conventions_from(value)  # raises ValueError naming the profile or field
        return value
    max_batch_size: int = Field(8, ge=1, description="requests per sampler call (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill")
    limits: Limits = Field(default_factory=Limits)
    storage: StorageConfig = Field(default_factory=StorageConfig)
