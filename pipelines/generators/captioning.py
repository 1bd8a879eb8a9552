"""Captioning with a transformers image-to-text model (type "image-to-text"): BLIP, BLIP-2, GIT...

Loads `AutoProcessor` and `AutoModelForImageTextToText` once per actor from a local directory or
a hub id. Decoding is greedy or beam search, so a caption is a function of the image alone (the
row's seed is still recorded). An image that does not decode, or a caption that comes out empty,
is a `Failure`.

    >>> config = CaptionerSettings(path="Salesforce/blip-image-captioning-large", dtype="float16")
    >>> captioner = ImageCaptioner(config, device="cuda")
    >>> captioner.generate([png_bytes], [0])
    ['a red circle on a black background']
"""

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from omniflow.codecs.base import load_pretrained
from omniflow.codecs.media import MediaError, decode_image
from pipelines.generators.base import DType, Failure, Generator, GeneratorSettings, Output


class CaptionerSettings(GeneratorSettings):
    type: Literal["image-to-text"] = "image-to-text"
    path: str = Field(description="a transformers image-to-text model directory or hub id (with its processor)")
    dtype: DType = "float32"
    prompt: str | None = Field(None, description="text the caption starts from, e.g. 'a picture of'")
    max_new_tokens: int = Field(30, ge=1)
    num_beams: int = Field(1, ge=1)


class ImageCaptioner(Generator):
    """Image bytes -> captions."""

    def __init__(self, config: CaptionerSettings, *, device: str = "cpu"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        parameters = config.model_dump(exclude={"type", "path"})
        self.processor = load_pretrained(AutoProcessor.from_pretrained, config.path)
        self.model = load_pretrained(
            AutoModelForImageTextToText.from_pretrained, config.path, dtype=getattr(torch, config.dtype)
        )
        self.model.to(device).eval()
        super().__init__("caption", name=f"transformers:{type(self.model).__name__}", checkpoint=config.path,
                         parameters=parameters)
        self.config, self.device = config, device

    def generate(self, inputs: Sequence, seeds: Sequence[int]) -> list[Output]:
        import torch

        outputs: list[Output] = []
        images, rows = [], []
        for i, data in enumerate(inputs):
            try:
                images.append(decode_image(data))
                rows.append(i)
                outputs.append("")
            except MediaError as err:
                outputs.append(Failure(str(err)))
        if not rows:
            return outputs
        text = {"text": [self.config.prompt] * len(rows)} if self.config.prompt else {}
        batch = self.processor(images=images, return_tensors="pt", **text).to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **batch, max_new_tokens=self.config.max_new_tokens, num_beams=self.config.num_beams, do_sample=False
            )
        for i, caption in zip(rows, self.processor.batch_decode(ids, skip_special_tokens=True)):
            caption = caption.strip()
            outputs[i] = caption if caption else Failure("the captioner produced an empty caption")
        return outputs
