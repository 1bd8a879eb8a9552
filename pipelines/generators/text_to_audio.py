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

from omniflow.codecs.media import MediaError, check_audio, encode_audio
from pipelines.generators.base import DType, Failure, GeneratorSettings, Output, PromptedPipeline


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


class TextToAudio(PromptedPipeline):
    """Captions -> FLAC / WAV bytes with an AudioLDM2 pipeline."""

    def __init__(self, config: AudioLDM2Settings, *, device: str = "cpu"):
        super().__init__("audio", "AudioLDM2Pipeline", config, device=device)
        self.sample_rate = int(self.pipe.vocoder.config.sampling_rate)

    def generate(self, inputs: Sequence, seeds: Sequence[int]) -> list[Output]:
        c = self.config
        outputs, rows, result = self.run_pipeline(
            inputs, seeds, audio_length_in_s=c.audio_length_in_s, max_new_tokens=c.max_new_tokens
        )
        for i, wave_T in zip(rows, result.audios if result is not None else []):
            try:
                outputs[i] = encode_audio(check_audio(wave_T), self.sample_rate, format=c.audio_format)
            except MediaError as err:
                outputs[i] = Failure(f"generated audio is unusable: {err}")
        return outputs
