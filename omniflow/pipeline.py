"""`OmniFlowPipeline`: any-to-any generation from a model directory, as a diffusers pipeline.

    >>> pipe = OmniFlowPipeline.from_pretrained("runs/demo/model")
    >>> out = pipe(task="t2i", text="a small red circle", num_inference_steps=20, guidance_scale=3.0, seed=7)
    >>> out.images[0].save("circle.png")
    >>> pipe(task="i2t", image=out.images[0], seed=7).texts
    >>> pipe(task="t2a", text="a high tone").audios[0]          # float32 waveform at out.sample_rate

The components are the model directory's (`omniflow.model_dir`): the transformer and one codec per
modality, plus pooled encoders where the model has them. Sampling and decoding are
`omniflow.inference.AnyToAny`'s, so a pipeline call gives the bytes the HTTP service gives for the
same request and seed.
"""

import io
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from omniflow.codecs.media import decode_audio, encode_image
from omniflow.inference import AnyToAny, InputPreparer, Prepared, SamplingParams
from omniflow.modality import Modality
from omniflow.model_dir import COMPONENT_GROUPS, fetch_model_dir, save_model_dir

ImageInput = PIL.Image.Image | np.ndarray | bytes
AudioInput = bytes | tuple[np.ndarray, int]


@dataclass
class OmniFlowPipelineOutput(BaseOutput):
    """The task's targets, `num_outputs` of each: images as PIL, captions, waveforms (float32)."""

    images: list[PIL.Image.Image] | None = None
    texts: list[str] | None = None
    audios: list[np.ndarray] | None = None
    sample_rate: int | None = None


class OmniFlowPipeline(DiffusionPipeline):
    """Any-to-any generation: text, image and audio from any of the others (`omniflow.tasks`)."""

    def __init__(self, transformer: torch.nn.Module, image_codec: Any = None, audio_codec: Any = None,
                 text_codec: Any = None, image_pooled: Any = None, audio_pooled: Any = None,
                 text_pooled: Any = None):
        super().__init__()
        self.register_modules(transformer=transformer, image_codec=image_codec, audio_codec=audio_codec,
                              text_codec=text_codec, image_pooled=image_pooled, audio_pooled=audio_pooled,
                              text_pooled=text_pooled)
        self.info: dict[str, Any] = {}

    @classmethod
    def from_any_to_any(cls, runner: AnyToAny) -> "OmniFlowPipeline":
        components = {f"{m.value}_{suffix}": getattr(runner, group).get(m)
                      for group, suffix in COMPONENT_GROUPS.items() for m in Modality}
        pipe = cls(runner.model, **components)
        # the conventions it samples with, an override included, go with a saved copy
        pipe.info = {**runner.info, "conventions": runner.conventions.model_dump()}
        pipe._runner = runner
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, device: str = "cpu",
                        torch_dtype: torch.dtype | str = "float32", storage: Any = None,
                        conventions: str | Mapping[str, Any] | None = None, **unused: Any) -> "OmniFlowPipeline":
        """Load a model directory (local, or s3:// with `storage`, a `omniflow.storage.StorageConfig`).

        `torch_dtype` is the transformer's; the codecs run as their configs say. `conventions`
        overrides the directory's sampling conventions (`omniflow.conventions`, e.g. "reference")."""
        if unused:
            raise TypeError(f"OmniFlowPipeline.from_pretrained got unsupported options {sorted(unused)}")
        path = str(pretrained_model_name_or_path)
        if path.startswith("s3://"):
            path = str(fetch_model_dir(path, storage))
        dtype = str(torch_dtype).removeprefix("torch.")
        return cls.from_any_to_any(AnyToAny.load(path, device=device, dtype=dtype, conventions=conventions))

    def save_pretrained(self, save_directory: str | os.PathLike, **unused: Any) -> None:
        """Write a self-contained model directory (`omniflow.model_dir.save_model_dir`)."""
        save_model_dir(self.transformer, save_directory, extra=self.info)

    def tasks(self) -> list[str]:
        """The tasks this model can run."""
        return self._runner.tasks()

    @torch.inference_mode()
    def __call__(self, task: str, *, text: str | None = None, image: ImageInput | None = None,
                 audio: AudioInput | None = None, num_inference_steps: int = 28,
                 guidance_scale: float | Mapping[str, float] = 1.0, shift: float | Mapping[str, float] = 3.0,
                 seed: int | None = None, num_outputs: int = 1) -> OmniFlowPipelineOutput:
        """Generate the task's targets from its inputs.

        Args:
            task: "t2i", "i2t", "t2a", "a2t", "i2a", "a2i", "at2i", "it2a", "ai2t" or "joint".
            text, image, audio: the task's conditions (a PIL image, HxWx3 uint8 array or encoded
                bytes; WAV / FLAC bytes or a mono (waveform, sample_rate)).
            guidance_scale: one weight, or one per conditioning modality (the multi-modal rule).
            seed: output k is drawn with seed + k; random when not given.
        """
        runner: AnyToAny = self._runner
        if isinstance(image, PIL.Image.Image | np.ndarray):
            image = encode_image(image)
        inputs = InputPreparer(self.info["codecs"])(text=text, image=image, audio=audio)
        missing = sorted(m.value for m in _conditions(task) if m not in inputs)
        if missing:
            raise ValueError(f"task {task!r} needs {missing}")
        request = Prepared(task=task, inputs=inputs, seed=random.randrange(2**31) if seed is None else seed,
                           num_outputs=num_outputs,
                           params=SamplingParams(steps=num_inference_steps, shift=shift, guidance=guidance_scale))
        out = runner.run([request])[0]
        audios = [decode_audio(wav)[0] for wav in out.audio] if out.audio is not None else None
        return OmniFlowPipelineOutput(
            images=[PIL.Image.open(io.BytesIO(png)).convert("RGB") for png in out.image] if out.image else None,
            texts=out.text,
            audios=audios,
            sample_rate=runner.codecs[Modality.AUDIO].sample_rate if audios is not None else None,
        )


def _conditions(task: str) -> tuple[Modality, ...]:
    from omniflow.tasks import get_task

    return get_task(task).conditions
