"""The ShapesWorld renderer as a generator: the stand-in for generator models on the toy domain,
registered as `type: shapesworld` through the `omniflow_ray.generators` entry point
(`pipelines.plugins`).

Text-to-image and text-to-audio parse the concept (and size and position, where the caption names
them) from the caption and render a scene of it; captioning reads the concept and layout from
the image with the ShapesWorld checkers and renders a caption of them. The scene is drawn from
the row's seed, so the same seed renders the same bytes. Provenance names the generator
"shapesworld-renderer" and says that it stands in for a model.

    >>> gen = ShapesWorldGenerator("image", ShapesWorldSettings())
    >>> png = gen.generate(["a big red circle on the left"], [7])[0]
    >>> from omniflow.codecs.media import decode_image
    >>> from shapesworld import read_image
    >>> read_image([decode_image(png)])
    Reading(colours=['red'], shapes=['circle'])
"""

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from omniflow.codecs.media import MediaError, decode_image, encode_audio, encode_image
from pipelines.generators.base import Failure, Generator, GeneratorSettings, ModalityName, Output
from shapesworld import (
    IMAGE_SIZE,
    SAMPLE_RATE,
    Concept,
    Scene,
    parse_caption,
    read_image,
    read_layout,
    render_audio,
    render_captions,
    render_images,
    sample_scenes,
)

NAME = "shapesworld-renderer"
CHECKPOINT = "shapesworld"
# A scene drawn from the row's seed has the layout a caption asks for about one time in 18; up
# to this many draws (seed, seed + 1, ...) find one for all but ~1e-13 of rows, and the rest keep
# the first draw: the concept, which is what must match, is always the asked-for one.
LAYOUT_DRAWS = 512
TASKS = {"image": "text-to-image", "audio": "text-to-audio", "caption": "image-to-text"}


class ShapesWorldSettings(GeneratorSettings):
    """The renderer's output format; it has no weights. It fills any modality."""

    fills: ClassVar[tuple[ModalityName, ...]] = ("image", "audio", "caption")
    type: Literal["shapesworld"] = "shapesworld"
    image_size: int = Field(IMAGE_SIZE, ge=16)
    sample_rate: int = Field(SAMPLE_RATE, ge=8000)
    audio_format: Literal["FLAC", "WAV"] = "FLAC"

    def build(self, modality: ModalityName, *, device: str = "cpu") -> "ShapesWorldGenerator":
        return ShapesWorldGenerator(modality, self)


def scene_for(concept: Concept, seed: int, *, size: str | None = None, position: str | None = None) -> Scene:
    """A scene of `concept` drawn from `seed`, with the given size and position where possible."""
    first = None
    for draw in range(LAYOUT_DRAWS):
        scene = sample_scenes([concept], seed=(seed + draw) % 2**63)[0]
        first = first or scene
        if (size is None or scene.size == size) and (position is None or scene.position == position):
            return scene
    return first


class ShapesWorldGenerator(Generator):
    """Renders `modality` of the concept its input shows (see the module docstring)."""

    def __init__(self, modality: ModalityName, config: ShapesWorldSettings):
        parameters = {"task": TASKS[modality], "stands_in_for": "a generator model (ShapesWorld toy domain)"}
        if modality == "image":
            parameters["image_size"] = config.image_size
        elif modality == "audio":
            parameters.update(sample_rate=config.sample_rate, audio_format=config.audio_format)
        super().__init__(modality, name=NAME, checkpoint=CHECKPOINT, parameters=parameters)
        self.config = config

    def generate(self, inputs: Sequence, seeds: Sequence[int]) -> list[Output]:
        scene_of = self._image_scene if self.modality == "caption" else self._caption_scene
        scenes = [scene_of(x, seed) for x, seed in zip(inputs, seeds)]
        ok = [i for i, s in enumerate(scenes) if isinstance(s, Scene)]
        rendered = self._render([scenes[i] for i in ok]) if ok else []
        outputs: list[Output] = list(scenes)
        for i, value in zip(ok, rendered):
            outputs[i] = value
        return outputs

    def _caption_scene(self, caption: object, seed: int) -> Scene | Failure:
        parsed = parse_caption(caption)
        if parsed.colour is None or parsed.shape is None:
            return Failure(f"caption names no ShapesWorld concept (one colour and one shape): {caption!r}")
        return scene_for(Concept(parsed.colour, parsed.shape), seed, size=parsed.size, position=parsed.position)

    def _image_scene(self, data: bytes, seed: int) -> Scene | Failure:
        try:
            image = np.asarray(decode_image(data))
        except MediaError as err:
            return Failure(str(err))
        reading, layout = read_image([image]), read_layout([image])
        colour, shape = reading.colours[0], reading.shapes[0]
        if colour is None or shape is None:
            return Failure("image shows no ShapesWorld shape that the checkers can read")
        return scene_for(Concept(colour, shape), seed, size=layout.sizes[0], position=layout.positions[0])

    def _render(self, scenes: list[Scene]) -> list[Output]:
        if self.modality == "caption":
            return render_captions(scenes)
        if self.modality == "image":
            return [encode_image(image) for image in render_images(scenes, size=self.config.image_size)]
        waves_NT = render_audio(scenes, sample_rate=self.config.sample_rate)
        return [encode_audio(wave, self.config.sample_rate, format=self.config.audio_format) for wave in waves_NT]
