"""The path users take to a cluster: `ray start --head`, then the docs' `ray job submit` lines.

`ray job submit --working-dir .` runs a job in a temporary copy of the checkout without what
.gitignore lists (runs/): the docs' lines give every path under runs/ as `$RUNS/...` with
`RUNS=$PWD/runs`, so the job reads the toy models from, and writes its output to, the checkout.
The curation line runs here as written, with RUNS pointed at a temporary directory (the one
substitution the docs' block makes itself); the other lines are checked to have its shape.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
DATA_JOBS = ("jobs.curate", "jobs.synthesize", "jobs.encode")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the docs' lines -------------------------------------------------------------------------


def readme_submissions() -> dict[str, tuple[str, dict[str, str]]]:
    """module -> (its `ray job submit` line of the docs, continuation lines joined; the shell
    variables its block assigns before it)."""
    text = "\n".join(doc.read_text() for doc in DOCS)
    out = {}
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if m := re.fullmatch(r"([A-Z_]+)=(\S+)", line):
                variables[m.group(1)] = m.group(2)
            elif line.startswith("ray job submit"):
                tokens = shlex.split(line)
                module = tokens[tokens.index("--") + 3]
                out.setdefault(module, (" ".join(line.split()), dict(variables)))
    return out


def flat(value, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; list items by index."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def entrypoint(line: str) -> tuple[list[str], str, dict[str, str]]:
    """(the submit options, the config file, the overrides) of a `ray job submit` line."""
    tokens = shlex.split(line)
    split = tokens.index("--")
    options, command = tokens[:split], tokens[split + 1:]
    assert command[:2] == ["python", "-m"] and command[3] == "--config", line
    return options, command[4], dict(o.split("=", 1) for o in command[5:])


def test_readme_submissions_read_and_write_the_checkouts_runs():
    """Every path under runs/ that a job's config names is given as `$RUNS/<the same path>`, with
    RUNS the checkout's runs/: a relative one would resolve in the job's temporary copy, where
    runs/ is never uploaded and from where nothing written comes back."""
    submissions = readme_submissions()
    assert set(DATA_JOBS) <= set(submissions), sorted(submissions)
    for module in DATA_JOBS:
        line, variables = submissions[module]
        assert variables.get("RUNS") == "$PWD/runs", f"{module}: RUNS is not set to $PWD/runs before {line}"
        options, config_file, overrides = entrypoint(line)
        assert options[options.index("--working-dir") + 1] == ".", line
        config = yaml.safe_load((ROOT / config_file).read_text())
        under_runs = {k: v for k, v in flat(config).items() if isinstance(v, str) and v.startswith("runs/")}
        assert under_runs, f"{config_file} names nothing under runs/: this check has nothing to check"
        for key, value in under_runs.items():
            given = overrides.get(key)
            parent, _, index = key.rpartition(".")
            if given is None and index.isdigit() and parent in overrides:  # a list's item: the whole list is given
                items = yaml.safe_load(overrides[parent])
                given = items[int(index)] if isinstance(items, list) and int(index) < len(items) else None
            assert given == "$RUNS/" + value.removeprefix("runs/"), f"{module}: {key} ({value}) in {line}"
        for key, value in overrides.items():
            assert "runs/" not in value or value.startswith("$RUNS/"), f"{module}: {key}={value} is relative"


# ---- a cluster started with the CLI -------------------------------------------------------------


def cluster_processes(temp_dir: str, gcs_port: int) -> list[psutil.Process]:
    """The processes of the cluster that `ray start --head --temp-dir=temp_dir` started, and
    their children (workers, job drivers). Not `ray stop`: it ends every Ray on the machine."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        # the daemons name the temp dir; the client server only the GCS address
        if p.pid not in me and (temp_dir in cmd or re.search(rf"--address=\S+:{gcs_port}(?!\d)", cmd)):
            roots.append(p)
    found = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                found.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
    return [p for pid, p in found.items() if pid not in me]


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    processes = cluster_processes(temp_dir, gcs_port)
    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def head_node():
    """A one-node Ray cluster started with the CLI, with the Jobs API on loopback. Its ports are
    chosen here, not Ray's fixed defaults, so that it starts beside any other Ray on the machine."""
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    gcs, dashboard = _port(), _port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={gcs}", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={_port()}", f"--dashboard-agent-listen-port={_port()}",
             "--disable-usage-stats"]
    try:
        subprocess.run(start, env=env, cwd=ROOT, check=True, capture_output=True, timeout=180)
        # how the docs' lines reach it: RAY_ADDRESS names the Jobs API of a cluster not on 8265
        yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_cluster(temp_dir, gcs)


def submit(script: str, env: dict) -> subprocess.CompletedProcess:
    """Run shell lines from the repository root, as a user types them there."""
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def test_readme_curation_runs_as_a_ray_job(head_node, toy_clip, tmp_path):
    line, _ = readme_submissions()["jobs.curate"]
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "toy").symlink_to(toy_clip[0].parent)  # the session's toy models, laid out as runs/toy/
    result = submit(f"RUNS={shlex.quote(str(runs))}\n{line}\n", head_node)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout

    # the output is where the docs' $RUNS/... says, after the job's own directory is gone
    output = runs / "shapesworld" / "curated"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["config"]["output"] == str(output)
    assert manifest["config"]["clip"]["clip"]["pretrained"] == str(runs / "toy" / "clip" / "open_clip_model.safetensors")
    config = yaml.safe_load((ROOT / "configs" / "curate_shapesworld.yaml").read_text())
    assert set(manifest["counts"]) == {s["name"] for s in config["sources"]}
    for source in config["sources"]:
        counts = manifest["counts"][source["name"]]
        assert counts["input"] == source["samples"] == counts["kept"] + counts["filtered"] + counts["rejected"]
        assert counts["kept"] > 0
    assert list((output / "curated").glob("*/*.parquet"))


def test_a_relative_output_is_refused_under_ray_job_submit(head_node):
    """The line without the overrides would write into the job's temporary directory and lose it
    although the job succeeds: the job refuses it instead, naming the field."""
    result = submit("ray job submit --working-dir . -- python -m jobs.curate --config configs/curate_shapesworld.yaml",
                    head_node)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "error: output 'runs/shapesworld/curated' is relative" in log, log[-3000:]
    assert "absolute path or an s3:// URL" in log
