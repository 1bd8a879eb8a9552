"""What every job's entry point shares: the command line, manifests' helpers, progress lines.

Config loading is `omniflow.config`, Ray start-up `pipelines.runtime`."""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from omniflow.config import ConfigError, ConfigT, config_error, load_config


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
