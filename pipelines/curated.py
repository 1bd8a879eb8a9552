"""From the curate job's decisions to its outputs: counts and score statistics per source, the
curated parts, the rejects file and the score plots.

`summarize` is pure (tables in, numbers out); `write_curated` reads the scored parts with one Ray
Data task per part, so the parts (with their wide embedding column) never gather on the driver.

    >>> decisions = decide(scored, filters)                        # pipelines.filters
    >>> summary = summarize(decisions.table, scored, ["photos", "sounds"])
    >>> weights = source_weights(summary.kept(), summary.mean_kept, priors, weighting)
    >>> write_curated(index_parts(scored_parts, storage), decisions.table, weights, "s3://bucket/run/curated/<run>", storage)
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from omniflow import storage as st
from pipelines.filters import SCORES, Decisions
from pipelines.manifest import CurateCounts
from pipelines.parts import AtomicParquetSink, PartIndex, read_parts_dataset
from pipelines.plots import score_histogram
from pipelines.schema import (
    CURATED_SAMPLE,
    DROPPED_SAMPLE,
    FILTERED,
    KEPT,
    REJECTED,
    SCHEMA_VERSION,
    conform,
)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class Summary:
    """Per source: its counts, its score quantiles, and the mean score of its kept rows."""

    counts: dict[str, CurateCounts]
    quantiles: dict[str, dict[str, dict[str, float]]]
    mean_kept: dict[str, dict[str, float]]

    def kept(self) -> dict[str, int]:
        return {name: c.kept for name, c in self.counts.items()}


def scores_of(table: pa.Table, score: str) -> np.ndarray:
    """A score column as float64, NaN where the row has none."""
    return pc.fill_null(table.column(score).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)


def quantiles_of(values: np.ndarray) -> dict[str, float]:
    """{"q05": ..., "q95": ...} of the finite values; empty when there are none."""
    values = values[np.isfinite(values)]
    if not values.size:
        return {}
    return {f"q{int(q * 100):02d}": round(float(np.quantile(values, q)), 6) for q in QUANTILES}


def summarize(decided: pa.Table, scored: pa.Table, sources: Sequence[str]) -> Summary:
    """Counts, quantiles and kept means per source from `decide`'s table and the scored rows,
    both in the same row order (`decide` keeps its input's)."""
    status = decided.column("status").to_numpy(zero_copy_only=False)
    source = decided.column("source").to_numpy(zero_copy_only=False)
    kept = status == KEPT
    counts, quantiles, mean_kept = {}, {}, {}
    for name in sources:
        mine = source == name
        stages = decided.filter(pa.array(mine & ~kept)).group_by(["status", "stage"]).aggregate([("key", "count")])
        counts[name] = CurateCounts(
            input=int(mine.sum()), kept=int((mine & kept).sum()),
            filtered=int((mine & (status == FILTERED)).sum()), rejected=int((mine & (status == REJECTED)).sum()),
            by_stage={f"{r['status']}/{r['stage']}": r["key_count"] for r in stages.to_pylist()},
        )
        quantiles[name], mean_kept[name] = {}, {}
        for score in SCORES:
            values = scores_of(scored, score)
            q = quantiles_of(values[mine])
            if q:
                quantiles[name][score] = q
                kept_values = values[mine & kept]
                kept_values = kept_values[np.isfinite(kept_values)]
                if kept_values.size:
                    mean_kept[name][score] = float(kept_values.mean())
    return Summary(counts, quantiles, mean_kept)


def write_curated(scored: PartIndex, decided: pa.Table, weights: dict[str, float], directory: str,
                  storage: st.StorageConfig) -> None:
    """The kept rows of the `scored` parts as curated parts under `directory`, each row with its
    source's sampling weight."""
    not_kept = set(decided.filter(pc.not_equal(decided.column("status"), KEPT)).column("key").to_pylist())
    reads = scored.reads(skip=not_kept)
    if reads:
        read_parts_dataset(reads, storage, schema=CURATED_SAMPLE, prepare=functools.partial(_weighted, weights=weights),
                           ).write_datasink(AtomicParquetSink(directory, CURATED_SAMPLE, storage))


def _weighted(part: pa.Table, weights: dict[str, float]) -> pa.Table:
    weight = pa.array([weights[s] for s in part.column("source").to_pylist()], pa.float32())
    return part.append_column("source_weight", weight)


def write_rejects(decided: pa.Table, path: str, storage: st.StorageConfig) -> None:
    """Every row not kept, with its status, stage and reason, as one `DROPPED_SAMPLE` file."""
    dropped = decided.filter(pc.not_equal(decided.column("status"), KEPT))
    dropped = dropped.append_column("schema_version", pa.array(np.full(dropped.num_rows, SCHEMA_VERSION, np.int16)))
    st.write_parquet_atomic(conform(dropped, DROPPED_SAMPLE), path, storage)


def write_plots(scored: pa.Table, decisions: Decisions, sources: Sequence[str], directory: str,
                storage: st.StorageConfig) -> dict[str, str]:
    """A PNG per score that any source has, with each source's distribution and thresholds."""
    source = scored.column("source").to_numpy(zero_copy_only=False)
    plots = {}
    for score in SCORES:
        values = scores_of(scored, score)
        by_source = {n: values[source == n] for n in sources if np.isfinite(values[source == n]).any()}
        if by_source:
            path = st.join(directory, f"{score}.png")
            st.write_bytes_atomic(path, score_histogram(by_source, decisions.thresholds, score), storage)
            plots[score] = path
    return plots
