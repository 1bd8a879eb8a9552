"""The curated shards: each scored part's kept rows, with their source's sampling weight.

A Ray Data stage over part paths, so that the scored parts (with their wide embedding column) are
read by workers one at a time, never collected on the driver.
"""

import pyarrow as pa

from omniflow import storage as st
from pipelines.schema import CURATED_SAMPLE, conform
from pipelines.writer import read_parts


class KeepKept:
    """Ray Data stage: read one scored part per path, keep the rows whose key is in `kept`, attach
    `source_weight` from `weights` (source -> weight)."""

    def __init__(self, kept: set[str], weights: dict[str, float], storage: st.StorageConfig):
        self.kept, self.weights, self.storage = kept, weights, storage

    def __call__(self, batch: dict) -> pa.Table:
        tables = []
        for path in batch["path"]:
            part = read_parts([str(path)], self.storage)
            part = part.filter(pa.array([k in self.kept for k in part.column("key").to_pylist()], pa.bool_()))
            weight = pa.array([self.weights[s] for s in part.column("source").to_pylist()], pa.float32())
            tables.append(conform(part.append_column("source_weight", weight), CURATED_SAMPLE))
        return pa.concat_tables(tables) if tables else CURATED_SAMPLE.empty_table()
