"""Digests of what the data jobs write on ShapesWorld, to show that a change of code left their
outputs as they were: run it on two commits and compare the JSON.

    python benchmarks/stage_digests.py --out runs/bench/digests [--data-scale 0.25] [--toy runs/toy]

Runs curate -> synthesize -> encode with the configs the demo uses (sources scaled by
`--data-scale`), then writes `<out>/digests.json`: per stage and output, the row count, the part
count and a digest of every row (rows sorted by key, every column, tensors by value), beside each
job's counts and curate's source weights. Paths, timings and part names are left out: they differ
from run to run whatever the code.
"""

import argparse
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import curate, encode, synthesize
from pipelines.runtime import init_ray
from shapesworld.demo import stage_config
from shapesworld.toy.models import build_toy_models


def digest(paths: str | list[str]) -> dict:
    """Rows, parts and a digest of the rows (sorted by key) of the given part files."""
    paths = [paths] if isinstance(paths, str) else paths
    if not paths:
        return {"rows": 0, "parts": 0}
    table = pa.concat_tables([pq.read_table(p) for p in paths]).sort_by("key")
    h = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table.column(name)
        if isinstance(column.type, pa.ExtensionType):
            column = column.combine_chunks().storage
        h.update(name.encode())
        h.update(repr(column.to_pylist()).encode())
    return {"rows": table.num_rows, "parts": len(paths), "sha256": h.hexdigest()[:16]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/digests"))
    parser.add_argument("--toy", default="runs/toy", help="toy models (built there when absent)")
    parser.add_argument("--data-scale", type=float, default=0.25)
    args = parser.parse_args()
    out = str(args.out.absolute())
    build_toy_models(args.toy, workers=2)
    init_ray(2)

    def scale(data: dict) -> None:
        for source in data["sources"]:
            source["samples"] = max(50, round(source["samples"] * args.data_scale))

    manifests = {
        "curate": curate.run(stage_config(curate.CurateConfig, "curate_shapesworld.yaml", out, args.toy, scale)),
        "synthesize": synthesize.run(stage_config(synthesize.SynthesizeConfig, "synthesize_shapesworld.yaml", out,
                                                   args.toy)),
        "encode": encode.run(stage_config(encode.EncodeConfig, "encode_shapesworld.yaml", out, args.toy)),
    }
    report = {
        stage: {"outputs": {kind: digest(paths) for kind, paths in manifest["outputs"].items() if kind != "plots"},
                "counts": manifest["counts"]}
        for stage, manifest in manifests.items()
    }
    report["curate"]["source_weights"] = manifests["curate"]["source_weights"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digests.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps({s: r["outputs"] for s, r in report.items()}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
