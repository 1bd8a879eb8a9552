"""What a Ray Data stage reserves and where its model runs: shared by every job's stages.

Kept free of model imports so that any worker (a read or write task) can import it cheaply.

    >>> StageResources(num_gpus=1, concurrency=(1, 4), batch_size=256).map_batches_kwargs({})["num_gpus"]
    1.0
"""

from typing import TYPE_CHECKING, Any, Literal

import ray.data
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch


class StageResources(BaseModel):
    """How one stage runs: rows per batch, actors, and what each actor reserves.

    `concurrency` is a fixed actor count or a (min, max) autoscaling range. `device` "auto" uses
    CUDA when the actor sees a GPU (Ray shows an actor only the GPUs it reserved with `num_gpus`).
    """

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(64, gt=0)
    concurrency: int | tuple[int, int] = 1
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "StageResources":
        sizes = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency,)
        if min(sizes) < 1 or sizes != tuple(sorted(sizes)):
            raise ValueError(f"concurrency must be a positive count or a (min, max) range, got {self.concurrency}")
        if self.device == "cpu" and self.num_gpus > 0:
            raise ValueError(f"num_gpus={self.num_gpus} reserves GPUs that device='cpu' would not use")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device='cuda' needs num_gpus > 0: Ray hides GPUs from actors that reserve none")
        return self

    def map_batches_kwargs(self, constructor_kwargs: dict[str, Any]) -> dict[str, Any]:
        """`Dataset.map_batches` keyword arguments for a callable-class stage with these resources."""
        sizes = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency,) * 2
        return {
            "fn_constructor_kwargs": constructor_kwargs,
            "compute": ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1]),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "batch_size": self.batch_size,
            "batch_format": "pyarrow",
            "udf_modifying_row_count": False,
        }


def resolve_device(device: str) -> "torch.device":
    """The torch device for "auto" / "cpu" / "cuda", as this process sees it."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but this actor sees no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
