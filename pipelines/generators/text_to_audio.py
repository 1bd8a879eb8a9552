"""Text-to-audio with diffusers' `AudioLDM2Pipeline` (type "audioldm2").

The pipeline loads once per actor from a local directory or a hub id; each call renders a batch of
captions, each from its own seed, at the vocoder's sample rate, stored as FLAC or WAV. A silent or
non-finite clip becomes a `Failure`, not a training sample.

    >>> gen = TextToAudio(AudioLDM2Settings(path="cvssp/audioldm2", dtype="float16"), device="cuda")
    >>> flac = gen.generate(["a steady high tone"], [1234])[0]
"""

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from omniflow.codecs.base import load_pretrained
from omniflow.codecs.media import MediaError, check_audio, encode_audio
from pipelines.generators.base import DType, Failure, Generator, GeneratorSettings, Output, empty_text, torch_generators


class AudioLDM2Settings(GeneratorSettings):
    type: Literal["audioldm2"] = "audioldm2"
    path: str = Field(description="a diffusers AudioLDM2 pipeline directory or hub id")
    dtype: DType = "float32"
    steps: int = Field(200, ge=1)
    guidance_scale: float = Field(3.5, ge=0)
    audio_length_in_s: float = Field(10.24, gt=0)
    negative_prompt: str | None = "Low quality."
    max_new_tokens: int | None = Field(None, ge=1, description="GPT-2 steps; None: the checkpoint's own")
    audio_format: Literal["FLAC", "WAV"] = "FLAC"


class TextToAudio(Generator):
    """Captions -> FLAC / WAV bytes with an AudioLDM2 pipeline."""

    def __init__(self, config: AudioLDM2Settings, *, device: str = "cpu"):
        import diffusers
        import torch

        parameters = config.model_dump(exclude={"type", "path"})
        super().__init__("audio", name="diffusers:AudioLDM2Pipeline", checkpoint=config.path, parameters=parameters)
        self.config = config
        self.pipe = load_pretrained(
            diffusers.AudioLDM2Pipeline.from_pretrained, config.path, dtype=getattr(torch, config.dtype)
        )
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.sample_rate = int(self.pipe.vocoder.config.sampling_rate)

    def generate(self, inputs: Sequence, seeds: Sequence[int]) -> list[Output]:
        import torch

        outputs: list[Output] = [Failure("caption is empty") for _ in inputs]
        rows = [i for i, caption in enumerate(inputs) if not empty_text(caption)]
        if not rows:
            return outputs
        c = self.config
        extra = {"negative_prompt": [c.negative_prompt] * len(rows)} if c.negative_prompt else {}
        with torch.inference_mode():
            waves_NT = self.pipe(
                prompt=[inputs[i] for i in rows],
                num_inference_steps=c.steps,
                guidance_scale=c.guidance_scale,
                audio_length_in_s=c.audio_length_in_s,
                max_new_tokens=c.max_new_tokens,
                generator=torch_generators([seeds[i] for i in rows]),
                output_type="np",
                **extra,
            ).audios
        for i, wave_T in zip(rows, waves_NT):
            try:
                outputs[i] = encode_audio(check_audio(wave_T), self.sample_rate, format=c.audio_format)
            except MediaError as err:
                outputs[i] = Failure(f"generated audio is unusable: {err}")
        return outputs
