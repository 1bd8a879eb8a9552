"""What makes a training step cheaper on CPU: precision, torch.compile, threads, batch size and
skipping absent modalities (alone, and with batches of one modality group each), each varied alone from the demo's setting, measured in one run.

    python benchmarks/cpu_training_options.py --out runs/bench/cpu_options.json
    python benchmarks/cpu_training_options.py --steps 10 --variants baseline,bf16 --out q.json

Every variant runs `omniflow.training.train_step` on the `toy` preset in this process, on random
latents of the toy codecs' shapes with the stage-3 task mix (all ten tasks, one per sample).
Rates are samples/s after `--warmup` steps (compilation included there); `ratio` is against the
baseline (fp32, eager, 2 threads, batch 64, absent modalities fed as noise). Whether a faster
setting learns as well is `benchmarks/shapesworld_learning.py`'s question.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from omniflow.objective import FlowObjective, TrainingRules
from omniflow.presets import build_transformer, get_preset
from omniflow.tasks import BUILTIN_TASKS
from omniflow.training import (
    Batch,
    GroupedBatches,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    train_step,
)

BASELINE = {"precision": "fp32", "compile": False, "threads": 2, "batch_size": 64, "skip_absent": False,
            "grouped": False}
VARIANTS = {
    "baseline": {},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "1-thread": {"threads": 1},
    "batch-32": {"batch_size": 32},
    "batch-128": {"batch_size": 128},
    "skip-absent": {"skip_absent": True},
    "skip-absent+bf16": {"skip_absent": True, "precision": "bf16"},
    "skip-absent+grouped": {"skip_absent": True, "grouped": True},
}


def measure(setting: dict, *, steps: int, warmup: int, seed: int = 0) -> dict:
    torch.set_num_threads(setting["threads"])
    generator = torch.Generator().manual_seed(seed)
    shapes = get_preset("toy").latent_shapes()
    batch_size = setting["batch_size"]
    tasks = [BUILTIN_TASKS[name] for name in BUILTIN_TASKS]
    model = build_transformer("toy", seed=seed).train()
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=steps + warmup)
    forward = torch.compile(model) if setting["compile"] else model
    objective = FlowObjective(rules=TrainingRules(skip_absent=setting["skip_absent"]))
    groups = GroupedBatches(batch_size) if setting["grouped"] else None

    def mixed() -> Batch:
        picks = torch.randint(len(tasks), (batch_size,), generator=generator)
        return Batch(latents={m.value: torch.randn(batch_size, *s, generator=generator) for m, s in shapes.items()},
                     tasks=[tasks[i] for i in picks])

    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        if groups is None:
            batch = mixed()
        else:
            while (batch := groups.pop()) is None:
                groups.push(mixed())
        train_step(forward, [batch], optimizer=optimizer, scheduler=scheduler, objective=objective,
                   grad_clip=1.0, precision=setting["precision"], generator=generator)
    seconds = time.perf_counter() - start
    return {"samples_per_s": round(steps * batch_size / seconds, 1), "seconds_per_step": round(seconds / steps, 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    results = {}
    for name in args.variants.split(","):
        setting = {**BASELINE, **VARIANTS[name]}
        results[name] = {"setting": setting, **measure(setting, steps=args.steps, warmup=args.warmup)}
        print(f"{name:18s} {results[name]['samples_per_s']:8.1f} samples/s", flush=True)
    base = results.get("baseline")
    if base:
        for r in results.values():
            r["ratio"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
    report = {"benchmark": "cpu_training_options", "preset": "toy", "variants": results,
              "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
