"""What every generator shares: the interface, per-row seeds, provenance and config fields.

A generator fills one modality of a row from another: text-to-image and text-to-audio from the
caption, captioning from the image. It works on a batch of inputs with one seed per input and
returns, per input, the generated value (PNG / FLAC / WAV bytes, or a caption) or a `Failure`
saying why there is none, so that one bad row becomes a reject, never a failed batch.

    >>> seed = row_seed(0, "shapes/part-00000/7")
    >>> seed == row_seed(0, "shapes/part-00000/7") and 0 <= seed < 2**63
    True
"""

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipelines.schema import MEDIA_COLUMNS, MediaName

# The columns a generator can fill, as `pipelines.schema.TRIPLET_SAMPLE` names them.
ModalityName = MediaName
MODALITIES: tuple[ModalityName, ...] = MEDIA_COLUMNS
# What each modality is generated from: captions from images, image and audio from captions.
SOURCE_OF: dict[str, str] = {"caption": "image", "image": "caption", "audio": "caption"}
DType = Literal["float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class Failure:
    """No output for one input, and why (it becomes the row's reject reason)."""

    reason: str


Output = bytes | str | Failure


class GeneratorSettings(BaseModel):
    """What a generator needs to load and run; `type` names its family. The job's configs add the
    stage's resources (`pipelines.generators.config`), which actors do not need."""

    model_config = ConfigDict(extra="forbid")


class Generator(ABC):
    """Fills `modality` from its source modality (`SOURCE_OF`), deterministically per seed.

    `name`, `checkpoint` and `parameters` go into the provenance of everything it generates, so
    that an output can be traced and regenerated.
    """

    def __init__(self, modality: ModalityName, *, name: str, checkpoint: str, parameters: dict[str, Any]):
        self.modality, self.name, self.checkpoint, self.parameters = modality, name, checkpoint, parameters

    @abstractmethod
    def generate(self, inputs: Sequence[Any], seeds: Sequence[int]) -> list[Output]:
        """One output per input: captions (str) in for image / audio, image bytes in for captions."""

    def provenance(self, seed: int) -> dict[str, Any]:
        """A `pipelines.schema.PROVENANCE` value for an output made with `seed`."""
        return {
            "generator": self.name,
            "checkpoint": self.checkpoint,
            "seed": int(seed),
            "parameters": json.dumps(self.parameters, sort_keys=True),
        }


def row_seed(base_seed: int, key: str) -> int:
    """The seed of a row: a hash of the run's base seed and the row's key, in [0, 2**63).

    Independent of batching, order and which worker runs the row, so a rerun regenerates the
    same bytes.
    """
    digest = hashlib.sha256(f"{base_seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def torch_generators(seeds: Sequence[int]) -> list:
    """One CPU `torch.Generator` per seed. diffusers draws each sample's initial noise from its own
    generator (and on the CPU), so a row's output does not depend on its batch or the device."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def empty_text(text: object) -> bool:
    return not isinstance(text, str) or not text.strip()


class PromptedPipeline(Generator):
    """A diffusers pipeline prompted with captions: loaded once, an empty caption becomes a
    `Failure`, every other caption runs with its own seed in one pipeline call."""

    def __init__(self, modality: ModalityName, pipeline_class: str, config: Any, *, device: str):
        import diffusers
        import torch

        from omniflow.codecs.base import load_pretrained

        parameters = config.model_dump(exclude={"type", "path"})
        super().__init__(modality, name=f"diffusers:{pipeline_class}", checkpoint=config.path, parameters=parameters)
        self.config = config
        load = getattr(diffusers, pipeline_class).from_pretrained
        self.pipe = load_pretrained(load, config.path, dtype=getattr(torch, config.dtype))
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def run_pipeline(self, captions: Sequence[Any], seeds: Sequence[int], **call: Any) -> tuple[list[Output], list[int], Any]:
        """(outputs with a `Failure` for each empty caption, the rows that ran, the pipeline's result
        for those rows or None). `call` holds the family's own arguments."""
        import torch

        outputs: list[Output] = [Failure("caption is empty") for _ in captions]
        rows = [i for i, caption in enumerate(captions) if not empty_text(caption)]
        if not rows:
            return outputs, rows, None
        negative = getattr(self.config, "negative_prompt", None)
        if negative:
            call["negative_prompt"] = [negative] * len(rows)
        with torch.inference_mode():
            result = self.pipe(
                prompt=[captions[i] for i in rows],
                num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance_scale,
                generator=torch_generators([seeds[i] for i in rows]),
                output_type="np",
                **call,
            )
        return outputs, rows, result
