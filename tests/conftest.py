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
    """A local Ray cluster (2 CPUs) shared by the session's tests, started the way jobs start one.

    It starts after the S3 fixture: Ray workers take their S3 credentials from the environment
    they inherit, so the server's (fake) credentials must exist first.
    """
    import ray

    from jobs.common import init_ray

    init_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """One directory for the session's toy models, laid out as `runs/toy/` (clip/, codecs/)."""
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="session")
def toy_codecs(toy_dir):
    """The default toy codecs, built once per session, side by side as the demo builds them
    (about 1.5 minutes on 2 CPU cores)."""
    from omniflow.toy.codecs import build_toy_codecs
    from omniflow.toy.pool import build_pool

    out = toy_dir / "codecs"
    with build_pool(2) as pool:
        return out, build_toy_codecs(out, pool=pool)


@pytest.fixture(scope="session")
def toy_clip(toy_dir):
    """The default toy CLIP and aesthetic head, built once per session (about 40 s on 2 CPU cores)."""
    from omniflow.toy.clip import build_toy_clip

    out = toy_dir / "clip"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, build_toy_clip(out)
    finally:
        torch.set_num_threads(threads)
