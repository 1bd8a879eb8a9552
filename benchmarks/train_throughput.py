"""Training throughput: the Ray Train job against a bare single-process loop, and 2 workers against 1.

All runs train the same preset on the same latent dataset (made up by
`pipelines.synthetic_latents`, the layout an encode job writes) at the same per-worker batch size
with one torch thread per worker. The bare loop runs `omniflow.training.train_step` on batches
mixed in memory; the Ray runs are `jobs.train` with the dataset streamed through Ray Data. Rates
are steady-state samples/s: the mean of the job's reports after the first one (which holds
start-up and the first pass over the data), and the bare loop after its warm-up steps.

    python benchmarks/train_throughput.py --out runs/bench/train_throughput.json
    python benchmarks/train_throughput.py --preset sd3-medium --batch-size 8 --use-gpu --out mfu.json

Writes: bare and Ray samples/s and their ratio (goal >= 0.9), the Ray run's data-wait share of
step time (goal < 5%), and 2-worker scaling efficiency = rate(2) / (2 * rate(1)).
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.train import run
from jobs.train_config import TrainConfig
from omniflow.objective import FlowObjective
from omniflow.presets import build_transformer, get_preset, model_cost
from omniflow.storage import StorageConfig
from omniflow.training import OptimConfig, build_optimizer, build_scheduler, train_step
from pipelines.mixing import MixedBatches, Stream, to_batch
from pipelines.parts import read_parts
from pipelines.synthetic_latents import write_latent_dataset

TASKS = {"t2i": 1.0, "i2t": 1.0, "t2a": 1.0, "a2t": 1.0, "it2a": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--report-every", type=int, default=20)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true", help="skip the 2-worker run")
    return parser.parse_args(argv)


def bare_loop(args, latents: Path, manifest: dict) -> dict:
    """samples/s of train_step in this process on batches mixed from the latents in memory."""
    torch.set_num_threads(1)
    device = torch.device("cuda" if args.use_gpu else "cpu")
    table = read_parts(manifest["outputs"]["latents"], StorageConfig())
    blocks = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]
    stream = Stream(name="all", weight=1.0, tasks=TASKS, synthetic=True, open=lambda: iter(blocks))
    mix = MixedBatches([stream], batch_size=args.batch_size, seed=0, rank=0)
    torch.manual_seed(0)
    model = build_transformer(args.preset).to(device).train()
    optim = OptimConfig(lr=1e-4, warmup_steps=10)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=args.steps)
    objective = FlowObjective()
    precision = "bf16" if args.use_gpu else "fp32"
    warmup = args.report_every
    start = None
    for step in range(args.steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        table_, tasks = mix.next_batch(step)
        batch = to_batch(table_, tasks).to(device)
        train_step(model, [batch], optimizer=optimizer, scheduler=scheduler, objective=objective,
                   grad_clip=1.0, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"samples_per_s": (args.steps - warmup) * args.batch_size / seconds, "steps": args.steps - warmup}


def ray_run(args, latents: Path, storage: Path, workers: int) -> dict:
    config = TrainConfig.model_validate({
        "name": f"bench-{workers}", "storage_path": str(storage), "model": {"preset": args.preset},
        "datasets": [{"name": "all", "path": str(latents), "tasks": TASKS}],
        "steps": args.steps, "batch_size": args.batch_size, "optim": {"lr": 1e-4, "warmup_steps": 10},
        "ema": None, "checkpoint": {"every": args.steps}, "log": {"every": args.report_every},
        "validation": {"rows": 1, "every": 10**9}, "parallel": {"strategy": "ddp"},
        "scaling": {"num_workers": workers, "use_gpu": args.use_gpu,
                    "resources_per_worker": None if args.use_gpu else {"CPU": 0.5}},
    })
    manifest = run(config)
    reports = [json.loads(line) for line in (storage / config.name / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in reports[1:] if r["step"] < args.steps]  # the last report also checkpoints
    return {
        "workers": workers,
        "samples_per_s": float(np.mean([r["samples_per_s"] for r in steady])),
        "data_wait_share": float(np.mean([r["data_wait_share"] for r in steady])),
        "mfu": steady[-1].get("mfu"),
        "reports": len(steady),
        "train_seconds": manifest["train_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = get_preset(args.preset)
    shapes = {m.value: s for m, s in preset.latent_shapes().items()}
    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(tmp) / "latents"
        manifest = write_latent_dataset(latents, shapes, {"triplets": (["image", "caption", "audio"], args.rows, 1.0)},
                                        parts=8)
        bare = bare_loop(args, latents, manifest)
        one = ray_run(args, latents, Path(tmp) / "train", 1)
        two = None if args.skip_scaling else ray_run(args, latents, Path(tmp) / "train", 2)
    result = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "batch_size_per_worker": args.batch_size,
        "flops_per_sample": model_cost(preset.config, shapes).train_flops,
        "bare": bare,
        "ray_1_worker": one,
        "ray_over_bare": one["samples_per_s"] / bare["samples_per_s"],
        "data_wait_share": one["data_wait_share"],
        "ray_2_workers": two,
        "scaling_efficiency_2_workers": two["samples_per_s"] / (2 * one["samples_per_s"]) if two else None,
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
