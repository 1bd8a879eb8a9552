"""A bad config or override ends every job and `python -m serve` with one `error: ...` line naming
the key, and exit status 2: the CLIs as users run them, and many cases through `job_main`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import curate, train
from omniflow.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CURATE = "configs/curate_shapesworld.yaml"  # the README's config, valid as it is


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Config files that are broken in the ways a hand-edited file is."""
    paths = {"unparseable": "sources: []\noutput: runs: x\n", "list": "- output: runs/x\n", "scalar": "just a string\n"}
    out = {name: str(tmp_path / f"{name}.yaml") for name in paths}
    for name, text in paths.items():
        Path(out[name]).write_text(text)
    (tmp_path / "latin1.yaml").write_bytes("output: caf\xe9\n".encode("latin-1"))
    out["latin1"] = str(tmp_path / "latin1.yaml")
    out["missing"] = str(tmp_path / "missing.yaml")
    return out


CASES = {  # id: (arguments after the job's name, what the error line must say)
    "missing file": (["--config", "{missing}"], ["cannot read config", "missing.yaml"]),
    "a directory": (["--config", "{dir}"], ["cannot read config"]),
    "unparseable file": (["--config", "{unparseable}"], ["unparseable.yaml is not valid YAML", "at line 2, column 13"]),
    "not UTF-8": (["--config", "{latin1}"], ["latin1.yaml is not valid YAML"]),
    "top level a list": (["--config", "{list}"], ["list.yaml", "top level must be a mapping", "not a list"]),
    "top level a string": (["--config", "{scalar}"], ["top level must be a mapping", "not a str"]),
    "no =": (["--config", CURATE, "output"], ["override 'output' is not of the form key=value"]),
    "empty key": (["--config", CURATE, "=runs/x"], ["override '=runs/x' has an empty key"]),
    "empty key part": (["--config", CURATE, "ray..num_cpus=2"], ["'ray..num_cpus=2' has an empty key"]),
    "value then field inside": (["--config", CURATE, "ray=1", "ray.num_cpus=2"],
                                ["'ray.num_cpus=2' conflicts with 'ray=1'", "both set ray"]),
    "field inside then value": (["--config", CURATE, "ray.num_cpus=2", "ray=1"],
                                ["'ray=1' conflicts with 'ray.num_cpus=2'", "both set ray"]),
    "same key twice": (["--config", CURATE, "output=a", "output=b"], ["conflicts", "both set output"]),
    "invalid YAML value": (["--config", CURATE, "output=[1,"], ["override output: value '[1,' is not valid YAML"]),
    "unsafe YAML tag": (["--config", CURATE, "output=!!python/object/apply:os.system [ls]"],
                        ["override output", "not valid YAML"]),
    "unknown field": (["--config", CURATE, "bogus.depth=1"], ["bogus: Extra inputs are not permitted"]),
    "unknown nested field": (["--config", CURATE, "ray.gpus=1"], ["ray.gpus: Extra inputs are not permitted (got 1)"]),
    "wrong type": (["--config", CURATE, "ray.num_cpus=many"], ["ray.num_cpus:", "(got 'many')"]),
    "a mapping for a string": (["--config", CURATE, "output.path=x"], ["output: Input should be a valid string"]),
    "two bad fields": (["--config", CURATE, "ray.num_cpus=0", "weighting=3"], ["weighting: Input should be", "; ray.num_cpus: Input should be greater than or equal to 1 (got 0)"]),
    "no config at all": ([], ["output: Field required", "sources: Field required"]),
    "list index past the end": (["--config", CURATE, "sources.3.samples=10"],
                                ["override sources.3: sources is a list of 3 items; give an index from 0 to 2"]),
    "list item field unknown": (["--config", CURATE, "sources.0.bogus=1"], ["sources.0.source.shapesworld.bogus: Extra inputs"]),
}


def test_overrides_set_list_items_by_index():
    config = load_config(curate.CurateConfig, CURATE, ["sources.1.samples=10", "sources.2.filters.min_image_side=8"])
    assert [s.source.samples for s in config.sources] == [2000, 10, 500]
    assert config.sources[2].filters.min_image_side == 8 and config.sources[2].source.name == "shapes-image-audio"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_job_main_reports_one_error_line(case, files, tmp_path, capsys):
    args, fragments = CASES[case]
    argv = [a.format(dir=tmp_path, **files) for a in args]
    assert curate.main(argv) == 2
    _one_error_line(capsys.readouterr().err, *fragments)


def test_a_custom_loader_that_validates_a_model_itself(tmp_path, capsys):
    """`jobs.train --resume` builds its storage settings from the overrides before the config."""
    assert train.main(["--resume", str(tmp_path), "storage.endpoint=http://x"]) == 2
    _one_error_line(capsys.readouterr().err, "endpoint: Extra inputs are not permitted")


def test_messages_are_one_line_whatever_they_are_built_from(tmp_path):
    assert str(ConfigError("first\n  second\n\nthird ")) == "first second third"
    with pytest.raises(ConfigError) as caught:
        load_config(curate.CurateConfig, CURATE, ["sources=[{name: a, type: shapesworld, samples: 0}]",
                                                  f"output={'x' * 500}\nmore"])
    assert "\n" not in str(caught.value) and "sources.0" in str(caught.value)


SUBPROCESS_CASES = {  # one user-facing run per entry point, each a different kind of mistake
    "jobs.curate": (["--config", CURATE, "ray=1", "ray.num_cpus=2"], ["conflicts with 'ray=1'"]),
    "jobs.synthesize": (["--config", "configs/synthesize_shapesworld.yaml", "fill=[image,"],
                        ["override fill", "not valid YAML"]),
    "jobs.encode": (["--config", "{missing}"], ["cannot read config", "missing.yaml"]),
    "jobs.train": (["--config", "{list}"], ["top level must be a mapping"]),
    "jobs.merge": (["--config", "{unparseable}"], ["is not valid YAML"]),
    "shapesworld.demo": (["steps.stage3=many"], ["steps.stage3:", "'many'"]),
    "serve": (["--model", "runs/none", "limits.max_steps=0"], ["limits.max_steps:"]),
}


@pytest.mark.parametrize("module", list(SUBPROCESS_CASES))
def test_cli_exits_2_with_one_error_line(module, files):
    args, fragments = SUBPROCESS_CASES[module]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", module, *(a.format(**files) for a in args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    _one_error_line(done.stderr, *fragments)
    assert done.stdout == ""
