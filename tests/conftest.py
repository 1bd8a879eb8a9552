"""Shared test setup: no hub access, deterministic CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["s3_server"]

import pytest
import torch

from omniflow.presets import build_transformer


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

    from pipelines.runtime import init_ray

    init_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """One directory for the session's toy models, laid out as `runs/toy/` (clip/, codecs/)."""
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="session")
def toy_models(toy_dir) -> tuple[dict, dict]:
    """The default toy CLIP and toy codecs, built once per session side by side as the demo builds
    them (about 3.5 minutes on 2 CPU cores): their manifests (clip, codecs)."""
    from shapesworld.toy.models import build_toy_models

    return build_toy_models(toy_dir, workers=2)


@pytest.fixture(scope="session")
def toy_codecs(toy_dir, toy_models):
    """The session's toy codecs: their directory and manifest."""
    return toy_dir / "codecs", toy_models[1]


@pytest.fixture(scope="session")
def toy_clip(toy_dir, toy_models):
    """The session's toy CLIP, aesthetic head and audio tower: their directory and manifest."""
    return toy_dir / "clip", toy_models[0]
