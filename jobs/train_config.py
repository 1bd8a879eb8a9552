"""The training job's configuration: one pydantic model, validated where it is loaded."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omniflow import storage as st
from omniflow.ema import EMAConfig
from omniflow.objective import FlowObjective
from omniflow.parallelize import ParallelConfig
from omniflow.training import OptimConfig
from pipelines.mixing import DatasetSpec
from pipelines.runtime import RayConfig


class ModelSpec(BaseModel):
    """The transformer to train: a preset with overrides, or weights to start from.

    `init`: a model directory or a training checkpoint directory (its EMA weights with
    `init_ema`), local or s3://, or `sd3:<path or hub id>` to convert SD3's MMDiT (image and text
    streams).
    """

    model_config = ConfigDict(extra="forbid")
    preset: str = "toy"
    overrides: dict[str, Any] = Field(default_factory=dict, description="transformer config fields, e.g. streams")
    init: str | None = None
    init_ema: bool = True


class ScalingSpec(BaseModel):
    """Ray Train's `ScalingConfig`: workers, and what each reserves."""

    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @property
    def cpus_per_worker(self) -> float:
        """What each worker reserves of the cluster's CPUs (Ray Train's default: one)."""
        return (self.resources_per_worker or {}).get("CPU", 1.0)


def room_for_data(scaling: ScalingSpec, cluster_cpus: float) -> str | None:
    """Why the workers leave Ray Data no CPU to read the latents with (each read task takes one),
    or None when they leave it one. On a cluster that cannot grow, such a run waits forever.

        >>> room_for_data(ScalingSpec(num_workers=2), cluster_cpus=2) is not None
        True
        >>> room_for_data(ScalingSpec(num_workers=2, resources_per_worker={"CPU": 0.5}), cluster_cpus=2)
    """
    reserved = scaling.num_workers * scaling.cpus_per_worker
    if cluster_cpus - reserved >= 1:
        return None
    return (
        f"{scaling.num_workers} training worker(s) reserve {reserved:g} of the cluster's {cluster_cpus:g} CPUs, "
        f"leaving {max(0.0, cluster_cpus - reserved):g}, and Ray Data needs 1 to read the latents: "
        f"let workers share cores (scaling.resources_per_worker='{{CPU: 0.5}}'), use fewer workers, "
        f"or start a larger local cluster (ray.num_cpus)"
    )


class CheckpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(500, ge=1, description="steps between checkpoints (the last step always saves)")
    keep: int = Field(2, ge=1, description="checkpoints kept in storage")


class LogSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = Field(10, ge=1, description="steps between metric reports")
    tensorboard_dir: str | None = Field(
        None, description="TensorBoard events, local or s3:// (default: <run dir>/tensorboard)"
    )
    upload_every_s: float = Field(
        60.0, gt=0, description="s3:// logs: seconds between uploads of metrics.jsonl and TensorBoard events "
        "(they are also uploaded at every checkpoint and at the end)"
    )


class ValidationSpec(BaseModel):
    """Loss at fixed flow times on fixed rows with fixed noise: comparable across steps and runs."""

    model_config = ConfigDict(extra="forbid")
    every: int | None = Field(None, ge=1, description="steps between validations (default: at checkpoints)")
    dataset: str | None = Field(
        None, description="the dataset whose first rows (of its sources, allowing one of its tasks) are used "
        "(default: the first)")
    rows: int = Field(64, ge=1)
    times: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    seed: int = 0


class ExportSpec(BaseModel):
    """The model directory written from the final checkpoint, for merging and serving."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="default: <storage_path>/<name>/model")
    use_ema: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TrainConfig(BaseModel):
    """Everything a training run needs. Example: configs/train_shapesworld_stage1.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = Field(description="run directories live here (local or s3://)")
    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    datasets: list[DatasetSpec] = Field(min_length=1)
    steps: int = Field(gt=0)
    batch_size: int = Field(32, gt=0, description="samples per micro-batch per worker")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    objective: FlowObjective = Field(default_factory=FlowObjective)
    grouped_batches: bool = Field(
        False, description="each step trains one modality group (t2i and i2t; t2a and a2t; ...), the mix re-cut into "
                           "full batches (`omniflow.training.GroupedBatches`); needs objective.rules.skip_absent")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig | None = Field(default_factory=EMAConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker; default: Ray's (the worker's reserved CPUs)")
    prefetch_batches: int = Field(2, ge=0)
    cache_mb_per_stream: float = Field(
        256, ge=0, description="a stream whose whole epoch fits in this much memory is replayed from memory afterwards"
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    peak_tflops: float | None = Field(
        None, gt=0, description="peak dense TFLOP/s per device at the training precision, for MFU (default: known GPUs)"
    )
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        names = [d.name for d in self.datasets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"dataset names must be unique; repeated: {repeated}")
        if self.validation.dataset is not None and self.validation.dataset not in names:
            raise ValueError(f"validation.dataset {self.validation.dataset!r} is not one of the datasets {names}")
        if self.grouped_batches and not self.objective.rules.skip_absent:
            raise ValueError("grouped_batches needs objective.rules.skip_absent: true (a group leaves out what it lacks)")
        if self.parallel.strategy == "none" and self.scaling.num_workers > 1:
            raise ValueError("parallel.strategy 'none' runs one worker; use ddp or fsdp for scaling.num_workers > 1")
        return self

    @property
    def run_dir(self) -> str:
        return st.join(self.storage_path, self.name)
