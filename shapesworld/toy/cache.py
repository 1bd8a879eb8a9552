"""Build directories keyed by a config hash: reuse a finished build, commit a new one whole."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def is_built(out: Path, manifest_name: str, digest: str) -> bool:
    """Whether `out` holds a finished build of the config with `digest`."""
    path = out / manifest_name
    return path.is_file() and json.loads(path.read_text()).get("config_hash") == digest


def cached_manifest(out: Path, manifest_name: str, digest: str, *, force: bool, what: str, log: Callable) -> dict | None:
    """The manifest of the build in `out` if it was made from the config with `digest`, else None."""
    path = out / manifest_name
    if not path.exists() or force:
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("config_hash") == digest:
        log(f"{what} in {out} is up to date (config {digest})")
        return manifest
    log(f"{what} config changed: rebuilding {out}")
    return None


def new_staging(out: Path) -> Path:
    """An empty directory beside `out` to build into; a killed build leaves only this behind."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit(staging: Path, out: Path, manifest_name: str, manifest: dict) -> dict:
    """Write the manifest into `staging`, then replace `out` with it."""
    (staging / manifest_name).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return manifest
