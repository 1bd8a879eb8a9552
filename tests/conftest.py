"""Shared test setup: no hub access, deterministic CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["s3_server"]

import pytest  # noqa: E402
import torch  # noqa: E402

from omniflow.presets import build_transformer  # noqa: E402


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer("tiny").eval()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster (2 CPUs) shared by the session's tests, started the way jobs start one
    (`tests/test_job_submit.py` has to stop it, and starts it again).

    It starts after the S3 fixture: Ray workers take their S3 credentials from the environment
    they inherit, so the server's (fake) credentials must exist first.
    """
    import ray

    from jobs.common import init_ray

    init_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield


@pytest.fixture(scope="session")
def toy_codecs(tmp_path_factory):
    """The default toy codecs, built once per test session (about three minutes on 2 CPU cores)."""
    from omniflow.toy.codecs import build_toy_codecs

    out = tmp_path_factory.mktemp("toy") / "codecs"
    return out, build_toy_codecs(out)
