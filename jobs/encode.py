"""Pre-encode curated or synthesized rows into latent Parquet shards on Ray Data.

    python -m jobs.encode --config configs/encode_shapesworld.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.encode --config FILE.yaml output=s3://bucket/latents

`input` is the output directory of a curate or synthesize job (its `manifest.json` lists the
parts). One pipeline: read the parts -> decode media into the codecs' inputs on CPU actors ->
encode every present modality with the configured codecs on encoder actors (GPUs when given) ->
latent parts and rejects parts, each committed whole -> `manifest.json`, written last. A rerun
skips every row already in a latents or rejects part, so a killed job resumes without losing or
repeating a row.

Output layout under `output`:
    latents/part-*.parquet   one row per encoded sample (`pipelines.schema.latent_sample_schema`)
    rejects/part-*.parquet   rows that failed to decode or encode, with stage and reason
    manifest.json            config and hash, input, counts, latent shapes and dtype, codecs, timings
"""

import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from jobs.common import Progress, job_main
from omniflow import storage as st
from omniflow.codecs import read_codec_set
from pipelines.encode import (
    EncodingConfig,
    LatentEncoder,
    LatentPreprocess,
    latent_sink,
    read_encode_inputs,
)
from pipelines.latents import LatentLayout, latent_layout
from pipelines.manifest import (
    EncodeCounts,
    EncodeManifest,
    manifest_path,
    read_upstream,
    write_manifest,
)
from pipelines.parts import KeptRejectedSink, committed_parts, index_parts, read_parts
from pipelines.runtime import RayConfig, init_ray
from pipelines.schema import LATENT_MODALITIES, LATENT_STORAGE

INPUT_JOBS = {"curate": "curated", "synthesize": "triplets"}  # input job -> its outputs entry


class EncodeConfig(EncodingConfig):
    """The encoding settings (`pipelines.encode.EncodingConfig`) plus input, output and the run."""

    input: str = Field(description="output directory of a curate or synthesize job (local or s3://)")
    output: str
    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)
    codec_sets: list[str] = Field(
        default_factory=list,
        description="codec set directories (`omniflow.codecs.read_codec_set`: a codecs.json listing codecs "
                    "and pooled encoders) whose entries set `codecs` and `pooled`")
    rows_per_shard: int = Field(1024, gt=0, description="rows per latent part (about; see AtomicParquetSink)")
    io_num_cpus: float = Field(0.5, gt=0, description="CPUs per read or write task")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="before")
    @classmethod
    def _codec_sets(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("codec_sets"), list):
            return data  # absent, or left to the field's own check, which names it
        data = dict(data)
        for root in data["codec_sets"]:
            try:
                listed = read_codec_set(root)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"codec_sets: {root!r} is not a codec set ({err})") from None
            for part, configs in listed.items():
                merged = dict(data.get(part) or {})
                for modality, config in configs.items():
                    # a dumped config (a manifest's) holds both, the same: that one validates again
                    if merged.get(modality, config) != config:
                        raise ValueError(f"{part}.{modality} is set both here and by codec set {root!r}: keep one")
                    merged[modality] = config
                data[part] = merged
        return data

    def encoding(self) -> EncodingConfig:
        return EncodingConfig.model_validate(self.model_dump(include=set(EncodingConfig.model_fields)))


def input_parts(config: EncodeConfig) -> tuple[str, dict]:
    """(input manifest path, its job and part paths)."""
    upstream = read_upstream(config.input, config.storage, job=tuple(INPUT_JOBS))
    return manifest_path(config.input), {"job": upstream.job, "parts": getattr(upstream.outputs, INPUT_JOBS[upstream.job])}


def _check_resumable(config: EncodeConfig, encoding: EncodingConfig, sink: KeptRejectedSink,
                     input_keys: set[str]) -> set[str]:
    """Keys already written by an earlier run into `output`; refuses output of other settings."""
    storage = config.storage
    for path in sink.parts()["latents"]:
        with st.open_input(path, storage) as f:
            found = latent_layout(pq.read_schema(f))
        if (found.dtype, found.codec_hash) != (encoding.dtype, encoding.codec_hash()):
            raise ValueError(
                f"{config.output} holds {found.dtype} latents of codecs {found.codec_hash}, this config makes "
                f"{encoding.dtype} latents of codecs {encoding.codec_hash()}: use a new output or delete it"
            )
    done = sink.done_keys()
    stray = done - input_keys
    if stray:
        raise ValueError(
            f"{config.output} holds {len(stray)} rows whose keys are not in input {config.input} "
            f"(e.g. {sorted(stray)[:3]}): use a new output directory or delete it"
        )
    return done


def output_layout(parts: list[str], encoding: EncodingConfig, storage: st.StorageConfig) -> LatentLayout:
    """The layout the latent parts were written with (no shapes when there are none)."""
    if not parts:
        return LatentLayout(encoding.dtype, {}, encoding.codec_hash())
    with st.open_input(parts[0], storage) as f:
        return latent_layout(pq.read_schema(f))


def _counts(config: EncodeConfig, inputs: pa.Table) -> dict[str, EncodeCounts]:
    """Per source: input = encoded + rejected, rejects by stage, encoded rows per modality."""
    storage = config.storage
    has = [f"has_{m}" for m in LATENT_MODALITIES]
    latents = read_parts(committed_parts(st.join(config.output, "latents"), storage), storage, ["source", *has])
    rejects = read_parts(committed_parts(st.join(config.output, "rejects"), storage), storage, ["source", "stage"])
    counts = {}
    for source in sorted(set(inputs.column("source").to_pylist())):
        mine = latents.filter(pc.equal(latents.column("source"), source)) if latents is not None else None
        bad = rejects.filter(pc.equal(rejects.column("source"), source)) if rejects is not None else None
        stages = bad.group_by("stage").aggregate([("source", "count")]).to_pylist() if bad is not None else []
        counts[source] = EncodeCounts(
            input=int(pc.sum(pc.equal(inputs.column("source"), source)).as_py()),
            encoded=mine.num_rows if mine is not None else 0,
            rejected=bad.num_rows if bad is not None else 0,
            by_stage={f"rejected/{r['stage']}": r["source_count"] for r in stages},
            encoded_with={m: int(pc.sum(mine.column(f"has_{m}")).as_py() or 0) if mine is not None else 0
                          for m in LATENT_MODALITIES},
        )
    return counts


def run(config: EncodeConfig) -> dict:
    """Encode every input row not yet written; return the manifest (also `output/manifest.json`)."""
    progress = Progress("encode")
    progress.phase("reading the input's keys")
    init_ray(config.ray.num_cpus)
    storage, encoding = config.storage, config.encoding()
    input_manifest, source_job = input_parts(config)
    sink = latent_sink(config.output, encoding, storage, rows_per_part=config.rows_per_shard)
    index = index_parts(source_job["parts"], storage)
    inputs = index.rows
    progress.log(f"{inputs.num_rows} input rows in {len(source_job['parts'])} parts ({source_job['job']} output)")

    done = _check_resumable(config, encoding, sink, set(inputs.column("key").to_pylist()))
    reads = index.reads(done)
    if done:
        progress.log(f"resuming: {len(done)} rows already encoded or rejected; {len(reads)} parts to read")

    progress.phase("encoding")
    if reads:  # with nothing to do, no actor is started (each loads the codecs)
        ds = read_encode_inputs(reads, storage, num_cpus=config.io_num_cpus)
        ds = ds.map_batches(LatentPreprocess, **LatentPreprocess.map_batches_kwargs(encoding))
        ds = ds.map_batches(LatentEncoder, **LatentEncoder.map_batches_kwargs(encoding))
        ds.write_datasink(sink, ray_remote_args={"num_cpus": config.io_num_cpus})

    progress.phase("counting")
    # A row written twice (a write task retried after it had committed, or a key the input holds
    # twice) stays once; a row in both latents and rejects stays in latents.
    duplicates = sink.deduplicate()
    counts = _counts(config, inputs)
    timings = progress.done()
    new_rows = inputs.num_rows - len(done)
    outputs = sink.parts()
    latent_parts = outputs["latents"]
    layout = output_layout(latent_parts, encoding, storage)
    manifest = EncodeManifest.of(
        config, timings,
        input={"path": config.input, "manifest": input_manifest, "job": source_job["job"], "parts": source_job["parts"]},
        counts=counts,
        resumed_rows=len(done),
        input_duplicate_keys=index.repeated_keys,
        duplicate_rows_dropped=duplicates.rows,
        modalities={
            "encoded": [m.value for m in encoding.modalities],
            "left_out": [m for m in LATENT_MODALITIES if m not in {x.value for x in encoding.modalities}],
        },
        latents={
            "dtype": layout.dtype,
            "storage_type": str(LATENT_STORAGE[layout.dtype]),
            "shapes": {name: list(shape) for name, shape in layout.shapes.items()},
            "codec_config_hash": layout.codec_hash,
        },
        codecs={m.value: c for m, c in encoding.codecs.items()},
        pooled={m.value: c for m, c in encoding.pooled.items()},
        outputs=outputs,
        rows_per_s=round(new_rows / timings["encoding"], 2) if timings.get("encoding") else None,
    )
    for name, c in counts.items():
        progress.log(f"{name}: {c.input} in = {c.encoded} encoded + {c.rejected} rejected {c.by_stage}")
    return write_manifest(config.output, manifest, storage)


def main(argv: list[str] | None = None) -> int:
    return job_main(EncodeConfig, run, argv, prog="python -m jobs.encode", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
