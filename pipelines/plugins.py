"""Extension points: source and generator types that another installed package provides.

A package adds a type by naming a pydantic model in its `pyproject.toml` under one of the entry
point groups below; the configs of every job then accept that model's `type` beside the built-in
ones, and nothing here imports the package by name. The toy domain plugs in this way:

    [project.entry-points."omniflow_ray.sources"]
    shapesworld = "shapesworld.source:ShapesWorldSource"

    [project.entry-points."omniflow_ray.generators"]
    shapesworld = "shapesworld.generator:ShapesWorldSettings"

    [project.entry-points."omniflow_ray.checkers"]
    shapesworld = "shapesworld.quality:check_outputs"

- a source is a `GeneratedSource` (samples a Python function makes, sharded by count);
- a generator is a `pipelines.generators.base.GeneratorSettings` with a `fills` class variable
  (the modalities it can fill) and a `build(modality)` method returning the
  `pipelines.generators.base.Generator`;
- a concept checker is a function `(modality, generated outputs, reference captions) -> [{attribute:
  agrees}]` that the evaluation job calls by name (`metrics.checkers`).

A plugin module imports only this module and `pipelines.generators.base`, never the modules that
build the config unions, so either side may be imported first.
"""

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.schema import MEDIA_COLUMNS, MediaName

SOURCES = "omniflow_ray.sources"
GENERATORS = "omniflow_ray.generators"
CHECKERS = "omniflow_ray.checkers"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # no "/": sample keys are split on it


def load(group: str) -> tuple[type, ...]:
    """The classes the installed packages name in entry point `group`, sorted by entry name."""
    found = sorted(entry_points(group=group), key=lambda ep: ep.name)
    return tuple(ep.load() for ep in found)


def load_named(group: str, name: str) -> Any:
    """The object an installed package names `name` in entry point `group`."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        raise ValueError(f"nothing named {name!r} in {group}; installed: {sorted(found)}")
    return found[name].load()


class SourceBase(BaseModel):
    """What every source config has: a unique name, the first part of every sample key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="unique per run; the first part of every key")


class GeneratedSource(SourceBase):
    """A source whose samples a Python function makes: `samples` records, `samples_per_shard` per
    shard (`part-00000`, `part-00001`, ...), each keeping the columns in `modalities`.

    A subclass sets `type` (a `Literal`) and implements `records`; the record at index i is always
    the same sample, which is what lets a killed job resume.
    """

    samples: int = Field(1000, ge=1)
    samples_per_shard: int = Field(250, ge=1)
    modalities: list[MediaName] = Field(default_factory=lambda: list(MEDIA_COLUMNS), min_length=1)

    def records(self) -> Sequence[dict[str, Any]]:
        """All `samples` records: dicts with `id` and each modality (image / audio bytes, caption
        text)."""
        raise NotImplementedError
