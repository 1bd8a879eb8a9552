"""The path users take to a real cluster: `ray start --head`, then `ray job submit` a curation."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A one-node Ray cluster started with the CLI, with the Jobs API on loopback.

    `ray stop` ends every Ray process on the machine, and a driver whose cluster is stopped under
    it exits: the session's in-process cluster is shut down first and started again afterwards.
    """
    import ray

    from jobs.common import init_ray

    was_running = ray.is_initialized()
    ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    dashboard = _port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={_port()}", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        if was_running:
            init_ray(2)


def test_ray_job_submit_runs_a_curation(head_node, tmp_path):
    address, env = head_node
    output = tmp_path / "curated"
    command = [
        str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
        "python", "-m", "jobs.curate",
        f"output={output}",
        "sources=[{name: shapes, type: shapesworld, samples: 60, seed: 1, defect_rate: 0.2, samples_per_shard: 20}]",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    manifest = json.loads((output / "manifest.json").read_text())
    counts = manifest["counts"]["shapes"]
    assert counts["input"] == 60 == counts["kept"] + counts["filtered"] + counts["rejected"]
