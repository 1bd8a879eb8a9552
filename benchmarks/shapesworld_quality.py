"""ShapesWorld any-to-any quality of a model directory: what `make demo` writes into metrics.json.

    python benchmarks/shapesworld_quality.py --model runs/demo/train/stage3/model --out runs/bench/quality.json
    python benchmarks/shapesworld_quality.py --model DIR --samples 500 --steps 28 --guidance 3 --out q.json

Per task (t2i, i2t, t2a, a2t, i2a, a2i, at2i): the share of generated outputs whose concept the
ShapesWorld checkers read back, on held-out scenes with fresh sampling seeds, with colour and shape
accuracy separately and the share of unreadable outputs (`shapesworld.quality`).
"""

import argparse
import json
import platform
from pathlib import Path

from omniflow.inference import AnyToAny
from shapesworld.quality import EVAL_TASKS, QualityConfig, evaluate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory exported by jobs.train or jobs.merge")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default=",".join(EVAL_TASKS))
    defaults = QualityConfig()  # the demo's measurement unless told otherwise
    p.add_argument("--samples", type=int, default=defaults.samples, help="per task")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--guidance", type=float, default=defaults.guidance)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    config = QualityConfig(tasks=tuple(args.tasks.split(",")), samples=args.samples, steps=args.steps,
                           guidance=args.guidance)
    report = {"benchmark": "shapesworld_quality", "model": args.model,
              **evaluate(AnyToAny.load(args.model, device=args.device), config),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({t: r["both"] for t, r in report["tasks"].items()}, indent=2))
    return report


if __name__ == "__main__":
    main()
