"""What every job shares: config loading with overrides, Ray start-up, manifests, progress lines."""

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)
PACKAGES = ("omniflow-ray", "ray", "torch", "torchvision", "diffusers", "transformers", "open_clip_torch", "pyarrow")


class ConfigError(ValueError):
    """A bad command line or config; the message is one line naming each bad field and value."""

    def __init__(self, message: str):
        # A job prints it as one `error: ...` line, whatever a validator or parser put in it.
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class RayConfig(BaseModel):
    """The local cluster a job starts when it does not join one (RAY_ADDRESS unset)."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (ignored when joining one)")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["a.b=3", "c=[1, 2]"] -> {"a": {"b": 3}, "c": [1, 2]}; values are parsed as YAML.

    Two overrides of one field, or of a field and a field inside it (`a=1 a.b=2`), are refused
    rather than one silently winning.

        >>> parse_overrides(["a.b=3", "c=[1, 2]", "d="])
        {'a': {'b': 3}, 'c': [1, 2], 'd': None}
    """
    out: dict[str, Any] = {}
    given: dict[tuple[str, ...], str] = {}  # each key set so far -> the override that set it
    for item in overrides:
        path, value = _parse_override(item)
        for earlier, by in given.items():
            shorter = min(len(earlier), len(path))
            if earlier[:shorter] == path[:shorter]:
                raise ConfigError(f"override {item!r} conflicts with {by!r}: both set {'.'.join(path[:shorter])}")
        given[path] = item
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """"a.b=[1, 2]" -> (("a", "b"), [1, 2])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    dotted, raw = item.split("=", 1)
    path = tuple(name.strip() for name in dotted.split("."))
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key or key part")
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's complaint and where, in one line (its own message spans several)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_error(err: ValidationError) -> ConfigError:
    """One line naming every field that failed and the value it got: `a.b: <why> (got 3); c: ...`."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {_short(e['input'])})" if "input" in e and not isinstance(e["input"], dict) else ""
        problems.append(f"{where}: {e['msg']}{got}")
    return ConfigError(f"invalid config: {'; '.join(problems)}")


def _read_yaml_mapping(path: str) -> dict:
    try:
        with open(path, "rb") as f:  # bytes: the YAML reader reports bad UTF-8 as a YAML error
            raw = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of field: value, not a {type(raw).__name__}")
    return raw


def load_config(model: type[ConfigT], source: str | dict | None, overrides: Sequence[str] = ()) -> ConfigT:
    """Read YAML file `source` (or take the dict itself), apply key=value overrides, validate with `model`.

    Every problem (a file that is missing, not YAML or not a mapping; a malformed or conflicting
    override; a field that does not validate) raises `ConfigError`, one line naming the key.
    """
    raw = source if isinstance(source, dict) else _read_yaml_mapping(source) if source else {}
    try:
        return model.model_validate(_merge(raw, parse_overrides(overrides)))
    except ValidationError as err:
        raise config_error(err) from None


def config_hash(config: BaseModel) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. output=s3://b/run1")
    return parser


def job_main(
    config_model: type[ConfigT],
    run: Callable[[ConfigT], Any],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str | None,
    parser: argparse.ArgumentParser | None = None,
    load: Callable[[argparse.Namespace], ConfigT] | None = None,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """A job's `main`: parse the command line, load and validate the config, run it.

    Returns the exit status: 0 when the run finished, 2 for a bad command line or config (one
    `error: ...` line on stderr naming what to fix), 1 for one of the job's own expected `errors`
    (message only, no traceback). `parser` and `load` replace the default
    `--config FILE key=value ...` handling.
    """
    args = (parser or job_parser(prog, description or "")).parse_args(argv)
    try:
        try:
            config = load(args) if load else load_config(config_model, args.config, args.overrides)
        except ValidationError as err:  # a `load` that validated a model of its own
            raise config_error(err) from None
        check_outputs_outlive_job(config)
        run(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# Fields that name where a job writes; what is written under a relative one would be lost (below).
OUTPUT_FIELDS = ("output", "storage_path", "export.path")


def check_outputs_outlive_job(config: BaseModel) -> None:
    """Refuse a relative output path in a job submitted with a working directory.

    `ray job submit --working-dir DIR` runs the job in a temporary copy of DIR that Ray deletes
    when the job ends, so a relative output would be written there and lost although the job
    succeeds. Ray passes the job's runtime env to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR.
    """
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return
    for dotted in OUTPUT_FIELDS:
        value: Any = config
        for name in dotted.split("."):
            value = getattr(value, name, None)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            raise ConfigError(
                f"{dotted} {value!r} is relative, and this job runs in the temporary copy of its working "
                f"directory that Ray deletes when the job ends: give an absolute path or an s3:// URL"
            )


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
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=log_to_driver)


class Progress:
    """Timestamped progress lines on stdout, and the wall time of each named phase."""

    def __init__(self, job: str):
        self.job, self.start, self.timings = job, time.perf_counter(), {}
        self._phase: tuple[str, float] | None = None

    def log(self, message: str) -> None:
        print(f"[{self.job} {time.perf_counter() - self.start:7.1f}s] {message}", flush=True)

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        if self._phase:
            self.timings[self._phase[0]] = round(now - self._phase[1], 2)
        self._phase = (name, now) if name else None
        if name:
            self.log(name)

    def done(self) -> dict[str, float]:
        self.phase("")
        return {**self.timings, "total": round(time.perf_counter() - self.start, 2)}


def dumps(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=False, default=str).encode()
