"""The evaluation job's configuration: which model, which benchmark sets and tasks, how to sample,
and with which feature extractors to measure.

    >>> EvaluateConfig.model_validate({
    ...     "model": "runs/demo/model", "output": "runs/demo/eval",
    ...     "benchmarks": [{"name": "shapes", "source": {"name": "shapes", "type": "shapesworld"}, "tasks": ["t2i"]}],
    ...     "metrics": {"clip": {"model_name": "ViT-B-32", "pretrained": "models/clip.safetensors"},
    ...                 "image_features": "clip"}}).sampling.steps
    28
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from omniflow import storage as st
from omniflow.codecs.base import read_codec_set
from omniflow.scoring.clap import ClapConfig
from omniflow.scoring.clip import ClipConfig
from omniflow.scoring.image_reward import ImageRewardConfig
from omniflow.tasks import get_task
from pipelines.evaluation.paper import PaperBenchmark
from pipelines.resources import StageResources
from pipelines.runtime import RayConfig
from pipelines.sources import SourceConfig


class BenchmarkConfig(BaseModel):
    """One benchmark set, read by the project's sources, and the tasks run on it: a row takes part
    in a task when it holds the task's conditions and a reference for its target."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceConfig
    tasks: list[str] = Field(min_length=1)
    references: Literal["same_medium", "row"] = Field(
        "same_medium", description="for tasks that generate text: rows with a byte-identical condition medium are "
                                   "one sample with every row's caption as a reference (same_medium), or each "
                                   "row is a sample with its own caption (row)")
    paper: PaperBenchmark | None = Field(
        None, description="the paper's benchmark this set stands for; its published numbers are printed beside")

    @field_validator("tasks")
    @classmethod
    def _one_target(cls, tasks: list[str]) -> list[str]:
        for name in tasks:
            if len(get_task(name).targets) != 1:
                raise ValueError(f"task {name!r} generates {len(get_task(name).targets)} modalities; "
                                 f"evaluation takes tasks with one target")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks lists a task twice: {tasks}")
        return tasks


class SamplingConfig(BaseModel):
    """The sampler's settings; sample i of a task draws from a seed hashed from `seed`, the task and
    the row's key, so a rerun (or a resumed run) regenerates the same outputs."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(28, ge=1)
    shift: float = Field(3.0, gt=0)
    guidance: float | dict[str, float] = Field(
        4.0, description="one classifier-free guidance weight, or one per conditioning modality")
    seed: int = Field(0, ge=0)
    conventions: str | dict[str, Any] | None = Field(
        None, description="sampling conventions over the model directory's (a profile, or fields)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


ImageFeatures = Literal["inception", "clip"]
AudioEmbedder = Literal["clap", "audio_tower"]


class MetricsConfig(BaseModel):
    """What measures the samples. Every model is read from a local or `s3://` path, never downloaded.

    - image targets: FID over `image_features` (torchmetrics' InceptionV3 from `inception_weights`,
      torch-fidelity's `pt_inception-2015-12-05` file, as the paper's COCO FID; or the `clip`
      model's image embeddings), CLIP score with `clip`, and ImageReward with `image_reward` (the
      release's files in a directory: `omniflow.scoring.image_reward`);
    - audio targets: FAD over the `audio_features` embedder's vectors and the audio-text score
      (CLAP score) with `audio_text`: `clap` (a CLAP model directory) or `audio_tower` (a pooled
      audio encoder config whose vectors live in `clip`'s text space, as the toy's);
    - text targets: CIDEr-D, BLEU-4 and ROUGE-L against the row's caption (`captions`);
    - `checkers`: a concept checker (installed packages name them; the toy domain's `shapesworld`
      reads colour and shape back from the generated output and from the row's caption).
    """

    model_config = ConfigDict(extra="forbid")
    clip: ClipConfig | None = None
    image_features: ImageFeatures | None = "inception"
    inception_weights: str | None = None
    image_reward: ImageRewardConfig | None = None
    clap: ClapConfig | None = None
    audio_tower: str | dict[str, Any] | None = Field(
        None, description="a pooled audio encoder config (kind, path, ...), or a local codec set directory "
                          "whose pooled audio encoder it is (the toy CLIP's, runs/toy/clip)")
    audio_features: AudioEmbedder | None = "clap"
    audio_text: AudioEmbedder | None = "clap"
    captions: bool = True
    checkers: str | None = Field(None, description="a concept checker's name (`shapesworld` for the toy domain)")
    reference_cache: str | None = Field(
        None, description="where the reference sets' feature statistics are cached (default: beside each "
                          "benchmark's files, or under output/reference for a generated source)")

    @field_validator("audio_tower")
    @classmethod
    def _codec_set(cls, tower: str | dict[str, Any] | None) -> dict[str, Any] | None:
        if not isinstance(tower, str):
            return tower
        pooled = read_codec_set(tower)["pooled"]
        if "audio" not in pooled:
            raise ValueError(f"{tower}'s codecs.json names no pooled audio encoder")
        return pooled["audio"]

    @model_validator(mode="after")
    def _embedders_given(self) -> "MetricsConfig":
        if self.image_features == "inception" and self.inception_weights is None:
            raise ValueError("image_features 'inception' needs inception_weights (torch-fidelity's "
                             "pt_inception-2015-12-05 weights file); or set image_features: clip or null")
        if self.image_features == "clip" and self.clip is None:
            raise ValueError("image_features 'clip' needs clip")
        for field in ("audio_features", "audio_text"):
            choice = getattr(self, field)
            if choice == "clap" and self.clap is None:
                raise ValueError(f"{field} 'clap' needs clap (a CLAP model directory); or set {field}: null")
            if choice == "audio_tower" and self.audio_tower is None:
                raise ValueError(f"{field} 'audio_tower' needs audio_tower")
        if self.audio_text == "audio_tower" and self.clip is None:
            raise ValueError("audio_text 'audio_tower' needs clip: its text side embeds the captions")
        return self


class EvaluateConfig(BaseModel):
    """The whole job."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a model directory, local or s3://")
    output: str
    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)
    benchmarks: list[BenchmarkConfig] = Field(min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    generation: StageResources = Field(
        default_factory=lambda: StageResources(batch_size=16),
        description="the actors that hold the model: samples per sampler call, actors, CPUs / GPUs each")
    scoring: StageResources = Field(
        default_factory=lambda: StageResources(batch_size=64),
        description="the actors that hold the feature extractors")
    rows_per_part: int = Field(256, ge=1, description="samples per Parquet part of the generated samples")
    report_samples: int = Field(4, ge=0, description="best and worst samples per task shown in report.html")
    io_num_cpus: float = Field(0.25, gt=0, description="CPUs per read or write task")
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, benchmarks: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [b.name for b in benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique: {names}")
        return benchmarks


def pairs(config: EvaluateConfig) -> list[tuple[BenchmarkConfig, str]]:
    """Every (benchmark, task) the job runs, in the config's order."""
    return [(b, task) for b in config.benchmarks for task in b.tasks]


