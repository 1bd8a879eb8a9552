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
    """A config that does not validate; the message names each bad field and value."""


class RayConfig(BaseModel):
    """The local cluster a job starts when it does not join one (RAY_ADDRESS unset)."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (ignored when joining one)")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["a.b=3", "c=[1, 2]"] -> {"a": {"b": 3}, "c": [1, 2]}; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        node = out
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(model: type[ConfigT], source: str | dict | None, overrides: Sequence[str] = ()) -> ConfigT:
    """Read YAML file `source` (or take the dict itself), apply key=value overrides, validate with `model`."""
    raw: dict = {}
    if isinstance(source, dict):
        raw = source
    elif source:
        try:
            with open(source) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config {source}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config {source} is not valid YAML: {err}") from None
    try:
        return model.model_validate(_merge(raw, parse_overrides(overrides)))
    except ValidationError as err:
        raise ConfigError(f"invalid config:\n{_describe(err)}") from None


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

    Returns the exit status: 0 when the run finished, 2 for a bad command line or config (the
    message names what to fix), 1 for one of the job's own expected `errors` (message only, no
    traceback). `parser` and `load` replace the default `--config FILE key=value ...` handling.
    """
    args = (parser or job_parser(prog, description or "")).parse_args(argv)
    try:
        config = load(args) if load else load_config(config_model, args.config, args.overrides)
        run(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


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
