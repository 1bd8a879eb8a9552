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
