"""ShapesWorld as a curate source (`type: shapesworld`), registered through the
`omniflow_ray.sources` entry point (`pipelines.plugins`).

    sources:
      - source: {type: shapesworld, name: shapes, samples: 2000, defect_rate: 0.1}
"""

import functools
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from pipelines.plugins import GeneratedSource
from shapesworld.defects import make_records


class ShapesWorldSource(GeneratedSource):
    """ShapesWorld triplets with planted defects: exactly the rows of
    `make_records(samples, seed=seed, defect_rate=defect_rate)`, `samples_per_shard` per shard.

    `modalities` keeps only some of each triplet, to stand in for pair datasets: ["image",
    "caption"] is an image-text set like LAION, ["audio", "caption"] an audio-text set like
    AudioSet, ["image", "audio"] a video-derived image-audio set like SoundNet."""

    type: Literal["shapesworld"] = "shapesworld"
    seed: int = Field(0, ge=0)
    defect_rate: float = Field(0.0, ge=0.0, le=1.0)

    def records(self) -> Sequence[dict[str, Any]]:
        return _records(self.samples, self.seed, self.defect_rate)


@functools.lru_cache(maxsize=2)
def _records(samples: int, seed: int, defect_rate: float) -> tuple[dict[str, Any], ...]:
    """All of a source's records, once per worker process: a shard is a slice of the whole set,
    since which rows carry defects depends on the total."""
    return tuple(make_records(samples, seed=seed, defect_rate=defect_rate))
