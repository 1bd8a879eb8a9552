"""Merge stage models, average or task-arithmetic compatible checkpoints, export EMA weights.

    python -m jobs.merge --config configs/merge_shapesworld.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.merge --config FILE.yaml output=s3://bucket/models/omni

Inputs are model directories or training checkpoints, local or s3:// (copied to a temp directory
first). The recipe (`omniflow.merge`: streams, average, task_arithmetic or export) runs in this
process, no Ray cluster needed, and the result is a model directory, uploaded when the output is
s3://. `manifest.json` is written last: a directory without it is not a finished merge.

Output layout under `output`: a self-contained model directory (`omniflow.model_dir`) that
`OmniFlowPipeline.from_pretrained` and the service load:
    model_index.json, transformer/   the merged transformer
    <modality>_codec/ ...            the codecs (and pooled encoders) of the streams, copied in
    omniflow.json    model info (latent shapes, codecs), per stream from the model that gave it
    merge.json       the recipe and what came from where
    manifest.json    config and hash, inputs, recipe, parameter counts, timings, versions
"""

import json
import sys
import tempfile
from pathlib import Path

from pydantic import Field

from jobs.common import Progress, job_main
from omniflow import storage as st
from omniflow.merge import MERGE_FILE, MergeConfig, MergeError, merge_model_dirs
from omniflow.model_dir import STATE_FILE, fetch_model_dir, publish_model_dir
from pipelines.manifest import MergeManifest, manifest_path, write_manifest


class MergeJobConfig(MergeConfig):
    """`omniflow.merge.MergeConfig` plus where s3:// paths live."""

    storage: st.StorageConfig = Field(default_factory=st.StorageConfig)


def _describe_input(path: str, local: Path) -> dict:
    """What the manifest records of an input: its kind, files and sizes, and a checkpoint's step."""
    files = {str(p.relative_to(local)): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
    entry: dict = {"path": path, "files": files}
    if (local / STATE_FILE).is_file():
        entry["kind"] = "training_checkpoint"
        entry["step"] = json.loads((local / STATE_FILE).read_text()).get("step")
    else:
        entry["kind"] = "model_dir"
    return entry


def run(config: MergeJobConfig) -> dict:
    """Run the merge and return the manifest (also written to `output/manifest.json`)."""
    progress = Progress("merge")
    storage = config.storage
    remote_output = st.scheme(config.output) != "file"
    with tempfile.TemporaryDirectory(prefix="merge-") as tmp:
        staged: dict[str, Path] = {}

        def resolve(path: str) -> Path:
            if path not in staged:
                if st.scheme(path) != "file":
                    progress.log(f"downloading {path}")
                staged[path] = fetch_model_dir(path, storage)
            return staged[path]

        progress.phase(f"merging ({config.recipe.method})")
        # A local output is swapped in whole (an earlier manifest goes with the old directory).
        model_dir = merge_model_dirs(config, resolve=resolve, write_to=Path(tmp) / "output" if remote_output else None)
        record = json.loads((model_dir / MERGE_FILE).read_text())
        outputs = {p.relative_to(model_dir).as_posix(): p.stat().st_size
                   for p in sorted(model_dir.rglob("*")) if p.is_file()}
        if remote_output:
            progress.phase(f"uploading to {config.output}")
            # The earlier manifest goes first, so that no reader takes a half-replaced model as whole.
            st.remove(manifest_path(config.output), storage)
            publish_model_dir(model_dir, config.output, storage)
        inputs = [_describe_input(path, staged[path]) for path in config.recipe.inputs()]

    by_source = record.get("elements_by_source", {})
    manifest = write_manifest(config.output, MergeManifest.of(
        config, progress.done(), inputs=inputs, recipe=record,
        # state-dict elements: the parameters and the fixed positional-embedding tables
        elements={"total": record["elements"], **({"by_source": by_source} if by_source else {})},
        outputs={"model_dir": config.output, "files": outputs},
    ), storage)
    progress.log(f"wrote {config.output}: {record['elements']:,} weights"
                 + (f", by source {by_source}" if by_source else ""))
    return manifest


def main(argv: list[str] | None = None) -> int:
    return job_main(MergeJobConfig, run, argv, prog="python -m jobs.merge", description=__doc__, errors=(MergeError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
