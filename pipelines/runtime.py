"""Ray start-up for jobs and the service: join the cluster RAY_ADDRESS names, or start a local one."""

import os
import tempfile

from pydantic import BaseModel, ConfigDict, Field


class RayConfig(BaseModel):
    """The local cluster a job starts when it does not join one (RAY_ADDRESS unset)."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (ignored when joining one)")


def init_ray(num_cpus: int | None = None, *, log_to_driver: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local one.

    A local cluster gets its own short temp dir (Ray's socket paths are length-limited, and a
    shared one keeps a stale cluster file after `ray stop`) and no dashboard. `log_to_driver`
    shows the workers' output here (training prints its progress from rank 0).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    if joins_cluster():
        ray.init(log_to_driver=True)
        return
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=log_to_driver)


def joins_cluster() -> bool:
    """Whether jobs join a running cluster (RAY_ADDRESS set, as under `ray job submit`), which may
    add nodes as work waits, rather than a local one of fixed size."""
    return bool(os.environ.get("RAY_ADDRESS"))
