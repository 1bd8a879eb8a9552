"""Extension points: the toy domain's source and generator types arrive through entry points, and
any `GeneratedSource` reads shard by shard like the built-in kinds."""

from typing import Literal

import pytest
from pydantic import ValidationError

from omniflow.storage import StorageConfig
from pipelines import plugins
from pipelines.generators.config import GeneratorsConfig
from pipelines.generators.factory import TYPES, build_generator
from pipelines.plugins import GeneratedSource
from pipelines.sources import list_shards, parse_source, read_shard


class Counting(GeneratedSource):
    type: Literal["counting"] = "counting"

    def records(self):
        return [{"id": f"n{i}", "caption": f"number {i}"} for i in range(self.samples)]


def test_the_toy_domain_plugs_in_through_entry_points():
    assert "ShapesWorldSource" in [c.__name__ for c in plugins.load(plugins.SOURCES)]
    assert "ShapesWorldSettings" in [c.__name__ for c in plugins.load(plugins.GENERATORS)]
    assert all("shapesworld" in TYPES[m] for m in ("image", "audio", "caption"))
    source = parse_source({"type": "shapesworld", "name": "toy", "samples": 3})
    assert type(source).__module__ == "shapesworld.source" and len(source.records()) == 3
    config = GeneratorsConfig.model_validate({"audio": {"type": "shapesworld", "resources": {"num_cpus": 0.5}}})
    assert config.audio.resources.num_cpus == 0.5
    assert build_generator("caption", config.audio).name == "shapesworld-renderer"
    with pytest.raises(ValidationError, match="'sd3', 'flux', 'shapesworld'"):
        GeneratorsConfig.model_validate({"image": {"type": "nope"}})


def test_a_generated_source_reads_by_shard():
    source = Counting(name="count", samples=5, samples_per_shard=2, modalities=["caption"])
    assert list_shards(source, StorageConfig()) == ["part-00000", "part-00001", "part-00002"]
    table = read_shard(source, "part-00002", StorageConfig())
    assert table.column("key").to_pylist() == ["count/part-00002/0"]
    assert table.column("sample_id").to_pylist() == ["n4"] and table.column("caption").to_pylist() == ["number 4"]
    assert table.column("image").null_count == 1
