"""Fill the missing modality of curated rows with generator models: image-text-audio triplets.

    python -m jobs.synthesize --config configs/synthesize_shapesworld.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.synthesize --config FILE.yaml output=s3://bucket/run

Reads a curate job's output (its `manifest.json` names the curated parts) and runs one Ray Data
pipeline: read parts -> caption missing captions from the image -> generate missing images and
audio from the caption (one actor stage per generator) -> triplet parts and reject parts, each
committed whole. Every generated modality carries `<modality>_synthetic` = true and its provenance
(generator, checkpoint, seed, parameters); a row's seed is a hash of `seed` and its key, so the
same config regenerates the same bytes. A row already holding all three modalities passes through
unchanged. A row that cannot be completed (its missing modality is not in `fill`, or generation
failed) becomes a reject with its reason. `manifest.json` is written last. A rerun skips every key
already in `triplets/` or `rejects/`, so a killed job resumes without losing or duplicating rows.

Output layout under `output`:
    triplets/part-*.parquet   `pipelines.schema.TRIPLET_SAMPLE` rows
    rejects/part-*.parquet    `pipelines.schema.DROPPED_SAMPLE` rows (status rejected, stage synthesize)
    manifest.json             config and hash, input, counts per source, outputs, timings, versions
"""

import functools
import re
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.common import Progress, job_main
from omniflow import storage as st
from pipelines.generators.base import MODALITIES, ModalityName
from pipelines.generators.config import GeneratorsConfig
from pipelines.generators.stage import ORDER, SYNTHESIS_SAMPLE, GenerateStage, start_rows
from pipelines.manifest import (
    SynthesizeCounts,
    SynthesizeManifest,
    manifest_path,
    read_upstream,
    write_manifest,
)
from pipelines.parts import KeptRejectedSink, PartIndex, index_parts, read_parts, read_parts_dataset
from pipelines.runtime import RayConfig, init_ray
from pipelines.schema import DROPPED_SAMPLE, TRIPLET_SAMPLE


class SynthesizeConfig(BaseModel):
    """The whole job: input, output, which modalities to fill and with which generators.

        >>> SynthesizeConfig.model_validate({"input": "runs/curated", "output": "runs/triplets", "fill": ["audio"],
        ...                                  "generators": {"audio": {"type": "shapesworld"}}}).fill
        ['audio']
    """

    model_config = ConfigDict(extra="forbid")
    input: str = Field(description="a curate job's output directory (holding its manifest.json)")
    output: str
    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)
    fill: list[ModalityName] = Field(default_factory=lambda: list(MODALITIES), min_length=1)
    seed: int = Field(0, ge=0, description="base seed; each row's seed is a hash of it and the row's key")
    generators: GeneratorsConfig = Field(default_factory=GeneratorsConfig)
    rows_per_part: int | None = Field(256, ge=1, description="rows per triplets part (None: one part per batch)")
    # Small, so that reads and writes run beside the generator actors, which hold their CPUs.
    io_num_cpus: float = Field(0.25, gt=0, description="CPUs per task that reads a curated part or writes one")
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("fill")
    @classmethod
    def _unique(cls, fill: list[str]) -> list[str]:
        if len(set(fill)) != len(fill):
            raise ValueError(f"fill lists a modality twice: {fill}")
        return fill

    @model_validator(mode="after")
    def _generator_per_filled_modality(self) -> "SynthesizeConfig":
        missing = [m for m in self.fill if getattr(self.generators, m) is None]
        if missing:
            raise ValueError(f"fill includes {missing} but generators.{missing[0]} is not configured")
        return self


# ---- input ---------------------------------------------------------------------------------


def curated_parts(config: SynthesizeConfig) -> tuple[str, list[str]]:
    """The input manifest's path and the curated part files it names."""
    upstream = read_upstream(config.input, config.storage, job="curate")
    return manifest_path(config.input), upstream.outputs.curated


# ---- the job -------------------------------------------------------------------------------

STAGE = "synthesize"  # the `stage` of every reject the job writes


def triplet_sink(config: SynthesizeConfig) -> KeptRejectedSink:
    """The job's output: complete rows under `triplets/`, rows it could not complete under `rejects/`."""
    return KeptRejectedSink(config.output, "triplets", TRIPLET_SAMPLE, config.storage,
                            rows_per_part=config.rows_per_part, reject_stage=STAGE)


def synthesize_stage(config: SynthesizeConfig, index: PartIndex, sink: KeptRejectedSink,
                     progress: Progress) -> None:
    """Generate and write every input row not yet in `sink`'s `triplets/` or `rejects/`."""
    done = sink.done_keys()
    reads = index.reads(done)
    if done:
        progress.log(f"resuming: {len(done)} rows already written")
    if not reads:
        progress.log("nothing left to generate")
        return
    ds = read_parts_dataset(reads, config.storage, schema=SYNTHESIS_SAMPLE,
                            prepare=functools.partial(start_rows, fill=list(config.fill)), num_cpus=config.io_num_cpus)
    for modality in ORDER:
        if modality in config.fill:
            generator = getattr(config.generators, modality)
            ds = ds.map_batches(GenerateStage, **GenerateStage.map_batches_kwargs(modality, generator, base_seed=config.seed))
    ds.write_datasink(sink, ray_remote_args={"num_cpus": config.io_num_cpus})


def _counts(input_counts: dict[str, int], triplets: pa.Table,
            rejects: pa.Table) -> dict[str, SynthesizeCounts]:
    counts = {}
    for source, n in sorted(input_counts.items()):
        mine = triplets.filter(pc.equal(triplets.column("source"), source))
        rejected = rejects.filter(pc.equal(rejects.column("source"), source))
        counts[source] = SynthesizeCounts(
            input=n, kept=mine.num_rows, rejected=rejected.num_rows,
            generated={m: int(pc.sum(mine.column(f"{m}_synthetic")).as_py() or 0) for m in MODALITIES},
        )
    return counts


def _reason_kind(reason: str) -> str:
    """A reject reason without the row's own text (a quoted caption at its end), for counting."""
    return re.sub(r":\s*(['\"]).*\1$", "", reason)


def run(config: SynthesizeConfig) -> dict:
    """Run the whole synthesis and return the manifest (also written to `output/manifest.json`)."""
    progress = Progress("synthesize")
    storage = config.storage
    input_manifest, parts = curated_parts(config)
    init_ray(config.ray.num_cpus)
    progress.log(f"{len(parts)} curated parts from {input_manifest}; filling {config.fill}")
    progress.phase("generating")
    index = index_parts(parts, storage)
    sink = triplet_sink(config)
    synthesize_stage(config, index, sink, progress)
    progress.phase("counting and checking")
    # A write task retried after it had committed leaves rows twice, or (first failed, then
    # succeeded) a key in both outputs: one copy stays, a triplet over a reject.
    duplicates = sink.deduplicate()
    outputs = sink.parts()
    flags = [f"{m}_synthetic" for m in MODALITIES]
    triplets = read_parts(outputs["triplets"], storage, columns=["key", "source", *flags])
    rejects = read_parts(outputs["rejects"], storage, columns=["key", "source", "reason"])
    triplets = triplets if triplets is not None else TRIPLET_SAMPLE.empty_table().select(["key", "source", *flags])
    rejects = rejects if rejects is not None else DROPPED_SAMPLE.empty_table().select(["key", "source", "reason"])
    counts = _counts(index.count_by_source(), triplets, rejects)
    reasons = Counter(_reason_kind(r) for r in rejects.column("reason").to_pylist())
    manifest = SynthesizeManifest.of(
        config, progress.done(), input={"manifest": input_manifest, "curated": parts}, counts=counts,
        reject_reasons=dict(reasons.most_common()), duplicate_rows_dropped=duplicates.rows, outputs=outputs,
    )
    for source, c in counts.items():
        progress.log(f"{source}: {c.input} in = {c.kept} kept + {c.rejected} rejected; generated {c.generated}")
    return write_manifest(config.output, manifest, storage)


def main(argv: list[str] | None = None) -> int:
    return job_main(SynthesizeConfig, run, argv, prog="python -m jobs.synthesize", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
