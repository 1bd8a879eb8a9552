"""Every job's `manifest.json`: one typed model per job, written last into its output as the commit
marker, and read back through one function by the job downstream.

    curate -> CurateManifest      synthesize -> SynthesizeManifest      encode -> EncodeManifest
    train  -> TrainManifest       merge      -> MergeManifest             evaluate -> EvaluateManifest

Each holds the resolved config and its hash (`omniflow.config.config_hash`), timings, package
versions and what the job made; counts are checked to add up when the model is built, so a job
never writes counts that do not (input = kept + filtered + rejected, and the like).

    >>> upstream = read_upstream("runs/shapesworld/curated", st.StorageConfig(), job="curate")
    >>> upstream.outputs.curated[:1]
    ['runs/shapesworld/curated/curated/3f2a.../part-00000.parquet']
"""

import importlib.metadata
import json
import sys
from collections import Counter
from typing import Annotated, Any, Literal, Self, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from omniflow import storage as st
from omniflow.config import ConfigError, config_hash
from pipelines.schema import MEDIA_COLUMNS, SCHEMA_VERSION, SYNTHETIC_FLAG

MANIFEST = "manifest.json"
PACKAGES = ("omniflow-ray", "ray", "torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "pyarrow")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Manifest(_Model):
    """What every job's manifest holds."""

    job: str
    schema_version: int = SCHEMA_VERSION
    config: dict[str, Any]
    config_hash: str
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def of(cls, config: BaseModel, timings: dict[str, float], **fields: Any) -> Self:
        """The manifest of a run of `config`: its dump and hash, and this process's versions."""
        return cls(config=config.model_dump(mode="json"), config_hash=config_hash(config), timings=timings,
                   versions=package_versions(), **fields)


def _adds_up(name: str, total: int, **parts: int) -> None:
    if total != sum(parts.values()):
        terms = " + ".join(f"{v} {k}" for k, v in parts.items())
        raise ValueError(f"{name}: {total} input != {terms}")


# ---- curate


class CurateCounts(_Model):
    input: int = Field(ge=0)
    kept: int = Field(ge=0)
    filtered: int = Field(ge=0)
    rejected: int = Field(ge=0)
    by_stage: dict[str, int] = Field(default_factory=dict, description="'<status>/<stage>' -> rows")

    @model_validator(mode="after")
    def _check(self) -> "CurateCounts":
        _adds_up("curate counts", self.input, kept=self.kept, filtered=self.filtered, rejected=self.rejected)
        return self


class CurateOutputs(_Model):
    curated: list[str]
    rejects: str | None = Field(description="the rejects file (None for adopted parts)")
    plots: dict[str, str] = Field(default_factory=dict)


class CurateManifest(Manifest):
    job: Literal["curate"] = "curate"
    inputs: dict[str, list[str]] = Field(description="source -> its shards")
    run_id: str
    counts: dict[str, CurateCounts]
    duplicate_scored_rows_dropped: int = 0
    duplicate_rows_dropped: int = 0
    score_quantiles: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    thresholds: dict[str, dict[str, Any]] = Field(default_factory=dict)
    source_weights: dict[str, float]
    outputs: CurateOutputs


# ---- synthesize


class SynthesizeCounts(_Model):
    input: int = Field(ge=0)
    kept: int = Field(ge=0)
    rejected: int = Field(ge=0)
    generated: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "SynthesizeCounts":
        _adds_up("synthesize counts", self.input, kept=self.kept, rejected=self.rejected)
        return self


class SynthesizeInput(_Model):
    manifest: str
    curated: list[str]


class SynthesizeOutputs(_Model):
    triplets: list[str]
    rejects: list[str]


class SynthesizeManifest(Manifest):
    job: Literal["synthesize"] = "synthesize"
    input: SynthesizeInput
    counts: dict[str, SynthesizeCounts]
    reject_reasons: dict[str, int] = Field(default_factory=dict)
    duplicate_rows_dropped: int = 0
    outputs: SynthesizeOutputs


# ---- encode


class EncodeCounts(_Model):
    input: int = Field(ge=0)
    encoded: int = Field(ge=0)
    rejected: int = Field(ge=0)
    by_stage: dict[str, int] = Field(default_factory=dict)
    encoded_with: dict[str, int] = Field(default_factory=dict, description="encoded rows holding each modality")

    @model_validator(mode="after")
    def _check(self) -> "EncodeCounts":
        _adds_up("encode counts", self.input, encoded=self.encoded, rejected=self.rejected)
        return self


class EncodeInput(_Model):
    path: str
    manifest: str
    job: Literal["curate", "synthesize"]
    parts: list[str]


class LatentsInfo(_Model):
    dtype: str
    storage_type: str
    shapes: dict[str, list[int]]
    codec_config_hash: str


class EncodeOutputs(_Model):
    latents: list[str]
    rejects: list[str]


class EncodeManifest(Manifest):
    job: Literal["encode"] = "encode"
    input: EncodeInput | None = Field(description="None for a data set made up on the spot (`pipelines.synthetic_latents`)")
    counts: dict[str, EncodeCounts]
    resumed_rows: int = 0
    input_duplicate_keys: int = 0
    duplicate_rows_dropped: int = 0
    modalities: dict[str, list[str]] = Field(description="'encoded' and 'left_out'")
    latents: LatentsInfo
    codecs: dict[str, dict[str, Any]]
    pooled: dict[str, dict[str, Any]] = Field(default_factory=dict)
    outputs: EncodeOutputs
    rows_per_s: float | None = None


# ---- train


class TrainDataset(_Model):
    path: str
    rows: dict[str, int] = Field(description="source -> rows")
    source_weights: dict[str, float]


class TrainManifest(Manifest):
    job: Literal["train"] = "train"
    datasets: dict[str, TrainDataset]
    stream_weights: dict[str, float]
    final_metrics: dict[str, Any]
    checkpoint: str
    model_dir: str
    metrics_log: str
    tensorboard_dir: str
    train_seconds: float


# ---- merge


class MergeInput(_Model):
    path: str
    kind: Literal["model_dir", "training_checkpoint"]
    files: dict[str, int] = Field(description="relative path -> bytes")
    step: int | None = None


class MergeOutputs(_Model):
    model_dir: str
    files: dict[str, int]


class MergeManifest(Manifest):
    job: Literal["merge"] = "merge"
    inputs: list[MergeInput]
    recipe: dict[str, Any]
    elements: dict[str, Any] = Field(description="state-dict elements: 'total', and 'by_source' for a merge")
    outputs: MergeOutputs


# ---- evaluate


class EvaluateManifest(Manifest):
    job: Literal["evaluate"] = "evaluate"
    model: str
    benchmarks: dict[str, dict[str, dict[str, Any]]] = Field(description="benchmark -> task -> metric -> value")
    beside_paper: list[dict[str, Any]]
    outputs: dict[str, str] = Field(description="'metrics', 'report', and '<benchmark>/<task>' -> its directory")


AnyManifest = Annotated[
    Union[CurateManifest, SynthesizeManifest, EncodeManifest, TrainManifest, MergeManifest,  # noqa: UP007
          EvaluateManifest],
    Field(discriminator="job"),
]
_ANY: TypeAdapter = TypeAdapter(AnyManifest)


def manifest_path(output: str) -> str:
    return st.join(output, MANIFEST)


def write_manifest(output: str, manifest: Manifest, storage: st.StorageConfig) -> dict:
    """Write `manifest` to `output/manifest.json` atomically (the job's commit marker); return it as
    the JSON-ready dict a job's `run` returns."""
    data = manifest.model_dump(mode="json")
    st.write_bytes_atomic(manifest_path(output), json.dumps(data, indent=2).encode(), storage)
    return data


def read_manifest(output: str, storage: st.StorageConfig) -> Manifest | None:
    """The manifest in job output `output`, typed by its `job`; None when there is none. A file that
    is not a manifest raises `ValueError` naming it."""
    path = manifest_path(output)
    if not st.exists(path, storage):
        return None
    try:
        return _ANY.validate_json(st.read_bytes(path, storage))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in err.errors()[:3])
        raise ValueError(f"{path} is not a job manifest this version reads ({problems})") from None


def read_upstream(output: str, storage: st.StorageConfig, *, job: str | tuple[str, ...],
                  field: str = "input") -> Manifest:
    """The manifest of the job output that config field `field` names, which must come from `job`
    (one name, or a tuple of them). Every problem is a `ConfigError` naming the field."""
    jobs = (job,) if isinstance(job, str) else job
    expected = " or ".join(jobs)
    try:
        manifest = read_manifest(output, storage)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}") from None
    if manifest is None:
        raise ConfigError(f"{field}: no {MANIFEST} in {output!r}; expected a finished {expected} job's output")
    if manifest.job not in jobs:
        raise ConfigError(f"{field}: {manifest_path(output)} is a {manifest.job} job's manifest; expected {expected}")
    return manifest


def is_reusable(output: str, config: BaseModel, storage: st.StorageConfig | None = None) -> Manifest | None:
    """The manifest in `output` when it was made with exactly `config` (the same config hash), so
    that its output can be used as it is; None otherwise."""
    try:
        manifest = read_manifest(output, storage or st.StorageConfig())
    except ValueError:
        return None
    return manifest if manifest is not None and manifest.config_hash == config_hash(config) else None


def adopt_parts(output: str, parts: list[str], storage: st.StorageConfig, *,
                job: Literal["curate", "synthesize"] = "curate") -> dict:
    """Write `output/manifest.json` for parts made outside the jobs, in the layout the job writes
    (`CURATED_SAMPLE` for curate, `TRIPLET_SAMPLE` for synthesize): a data set prepared by other
    tools, or a test's input, then reads as that job's output. Every row counts as kept; the
    counts come from the parts' `source` column."""
    from pipelines.parts import read_parts

    flags = list(SYNTHETIC_FLAG.values()) if job == "synthesize" else []
    table = read_parts(parts, storage, columns=["source", "source_weight", *flags])
    column = table.column("source").to_pylist() if table is not None else []
    rows = dict(sorted(Counter(column).items()))
    sources = list(rows)
    adopted = {"adopted": {"job": job, "parts": parts}}
    common = {"config": adopted, "config_hash": config_hash(adopted), "versions": package_versions()}
    if job == "curate":
        weights = {s: float(w) for s, w in zip(table.column("source").to_pylist(),
                                               table.column("source_weight").to_pylist())} if table is not None else {}
        manifest: Manifest = CurateManifest(
            **common, inputs={s: [] for s in sources}, run_id="adopted",
            counts={s: CurateCounts(input=n, kept=n, filtered=0, rejected=0) for s, n in rows.items()},
            source_weights=weights, outputs=CurateOutputs(curated=parts, rejects=None),
        )
    else:
        generated = {s: dict.fromkeys(MEDIA_COLUMNS, 0) for s in sources}
        for row in table.to_pylist() if table is not None else []:
            for c in MEDIA_COLUMNS:
                generated[row["source"]][c] += bool(row[f"{c}_synthetic"])
        manifest = SynthesizeManifest(
            **common, input=SynthesizeInput(manifest="", curated=[]),
            counts={s: SynthesizeCounts(input=n, kept=n, rejected=0, generated=generated[s]) for s, n in rows.items()},
            outputs=SynthesizeOutputs(triplets=parts, rejects=[]),
        )
    return write_manifest(output, manifest, storage)
