"""Curate image / audio / text datasets on Ray Data: decode, score, filter, weight.

    python -m jobs.curate --config configs/curate_shapesworld.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.curate --config FILE.yaml output=s3://bucket/run

One pipeline over every configured source: read shards (Parquet, WebDataset tars, folders, or a
type an installed package adds, as the toy domain adds `shapesworld`; local or s3://) -> decode on CPU (bad input becomes a rejects row with its reason) ->
CLIP image-text and aesthetic scores, CLAP audio-text scores (actor pools) -> scored parts, each
committed whole. Then, from the scores: per-source filters, exact-duplicate removal, per-source
sampling weights, curated Parquet shards, rejects Parquet, a PNG per score and `manifest.json`,
written last as the commit marker. A rerun skips every sample already scored, so a killed job
resumes without losing or duplicating rows.

Output layout under `output`:
    scored/part-*.parquet      every input sample with its scores (the resumable stage)
    curated/<run>/part-*.parquet  kept samples with scores and `source_weight`
    rejects/<run>.parquet      every sample not kept, with status, stage and reason
    plots/<score>.png          score distributions with thresholds
    manifest.json              config and hash, inputs, counts, quantiles, thresholds, weights, timings
"""

import sys
import uuid

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.common import Progress, job_main
from omniflow import storage as st
from pipelines.curated import summarize, write_curated, write_plots, write_rejects
from pipelines.decode import Decode, DecodeConfig
from pipelines.filters import SCORES, FilterConfig, decide
from pipelines.manifest import CurateManifest, write_manifest
from pipelines.parts import (
    AtomicParquetSink,
    PartIndex,
    committed_keys,
    committed_parts,
    deduplicate_parts,
    read_parts,
)
from pipelines.runtime import RayConfig, init_ray
from pipelines.schema import SCORED_SAMPLE
from pipelines.scorers import (
    ClapScoringConfig,
    ClipScoringConfig,
    add_clap_scoring,
    add_clip_scoring,
)
from pipelines.sources import SourceConfig, list_shards, read_sources
from pipelines.weighting import WeightingConfig, source_weights

SMALL_COLUMNS = [
    "key", "source", "sample_id", "caption", "image_width", "image_height", "audio_seconds", "content_hash",
    *SCORES, "reject_stage", "reject_reason",
]


class SourceSpec(BaseModel):
    """A source to read, plus its prior weight and its filters."""

    model_config = ConfigDict(extra="forbid")
    source: SourceConfig
    prior: float = Field(1.0, gt=0)
    filters: FilterConfig = Field(default_factory=FilterConfig)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data):
        """Accept the reader's fields at the top level: {name, type, path, ..., prior, filters}."""
        if isinstance(data, dict) and "source" not in data:
            data = dict(data)
            rest = {k: data.pop(k) for k in ("prior", "filters") if k in data}
            return {"source": data, **rest}
        return data


class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str
    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)
    sources: list[SourceSpec] = Field(min_length=1)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    clip: ClipScoringConfig | None = None
    clap: ClapScoringConfig | None = None
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> "CurateConfig":
        names = [s.source.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {duplicates}")
        return self


def score_stage(config: CurateConfig, progress: Progress) -> None:
    """Decode and score every sample not yet in `scored/`, committing whole parts."""
    storage, scored_dir = config.storage, st.join(config.output, "scored")
    done = committed_keys(scored_dir, storage)
    if done:
        progress.log(f"resuming: {len(done)} samples already scored")
    readers = [s.source for s in config.sources]
    ds = read_sources(readers, storage, skip_keys=done)
    ds = ds.map_batches(Decode, **Decode.map_batches_kwargs(config.decode))
    if config.clip is not None:
        ds = add_clip_scoring(ds, config.clip)
    if config.clap is not None:
        ds = add_clap_scoring(ds, config.clap)
    ds.write_datasink(AtomicParquetSink(scored_dir, SCORED_SAMPLE, storage))


def finalize(config: CurateConfig, progress: Progress) -> dict:
    """Filter, weight and write curated shards, rejects, plots; return the manifest's body."""
    storage = config.storage
    scored_dir = st.join(config.output, "scored")
    # A scoring write task retried after it had committed repeats its rows: one copy per key stays.
    scored_duplicates = deduplicate_parts(committed_parts(scored_dir, storage), storage=storage)
    parts = committed_parts(scored_dir, storage)
    # Embeddings are the one wide column: read them only when a near-duplicate rule needs them.
    columns = SMALL_COLUMNS + (["image_embedding"] if any(s.filters.near_duplicate_cosine for s in config.sources) else [])
    scored = read_parts(parts, storage, columns=columns, with_part=True)
    index = PartIndex.of(scored, parts)
    scored = (scored.drop_columns(["part"]) if scored is not None
              else SCORED_SAMPLE.empty_table().select(columns)).sort_by("key")

    names = [s.source.name for s in config.sources]
    decisions = decide(scored, {s.source.name: s.filters for s in config.sources})
    summary = summarize(decisions.table, scored, names)
    weights = source_weights(summary.kept(), summary.mean_kept, {s.source.name: s.prior for s in config.sources},
                             config.weighting)

    run_id = uuid.uuid4().hex[:12]
    curated_dir = st.join(config.output, "curated", run_id)
    rejects_path = st.join(config.output, "rejects", f"{run_id}.parquet")
    progress.phase("writing curated shards")
    write_curated(index, decisions.table, weights, curated_dir, storage)
    write_rejects(decisions.table, rejects_path, storage)
    # Retried curated write tasks leave copies too (rejects come from one write, disjoint from kept).
    duplicates = deduplicate_parts(committed_parts(curated_dir, storage), [rejects_path], storage=storage)
    plots = write_plots(scored, decisions, names, st.join(config.output, "plots"), storage)
    return {
        "run_id": run_id,
        "counts": summary.counts,
        "duplicate_scored_rows_dropped": scored_duplicates.rows,
        "duplicate_rows_dropped": duplicates.rows,
        "score_quantiles": summary.quantiles,
        "thresholds": decisions.thresholds,
        "source_weights": weights,
        "outputs": {"curated": committed_parts(curated_dir, storage), "rejects": rejects_path, "plots": plots},
    }


def run(config: CurateConfig) -> dict:
    """Run the whole curation and return the manifest (also written to `output/manifest.json`)."""
    progress = Progress("curate")
    init_ray(config.ray.num_cpus)
    storage = config.storage
    inputs = {s.source.name: list_shards(s.source, storage) for s in config.sources}
    progress.log(f"{sum(map(len, inputs.values()))} input shards from {len(inputs)} sources")
    progress.phase("decoding and scoring")
    score_stage(config, progress)
    progress.phase("filtering and weighting")
    body = finalize(config, progress)
    manifest = CurateManifest.of(config, progress.done(), inputs=inputs, **body)
    for name, c in manifest.counts.items():
        progress.log(f"{name}: {c.input} in = {c.kept} kept + {c.filtered} filtered + {c.rejected} rejected, "
                     f"weight {manifest.source_weights[name]:.3f}")
    written = write_manifest(config.output, manifest, storage)
    _remove_stale_runs(config, manifest.run_id)
    return written


def _remove_stale_runs(config: CurateConfig, run_id: str) -> None:
    """After the manifest names this run, outputs of earlier runs are no longer referenced."""
    storage = config.storage
    for kind, suffix in (("curated", ""), ("rejects", ".parquet")):
        root = st.join(config.output, kind)
        for path in st.list_files(st.join(root, "*"), storage):
            if not path.rstrip("/").endswith(run_id + suffix):
                st.remove(path, storage)


def main(argv: list[str] | None = None) -> int:
    return job_main(CurateConfig, run, argv, prog="python -m jobs.curate", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
