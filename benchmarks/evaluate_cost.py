"""What the evaluation job costs per 10,000 samples: measured on this machine, estimated for a GPU.

Measured: `jobs.evaluate` runs the ShapesWorld config on a model directory twice, with `--small`
and `--large` rows per benchmark set; the difference between the two runs' phase times, divided
by the difference in rows, is the cost of one more sample per task (generation and scoring apart),
free of start-up (Ray, actors, model loading), which the small run's remainder gives.

Estimated: the sampler's matmul FLOPs per sample for the paper's model size (the `sd3-medium`
preset: SD3-medium's 24 layers at 1536 wide with the audio stream, 512 x 512 images, 10 s audio)
and each task (`steps` x its guidance branches x one forward over every stream it runs:
`omniflow.presets.model_cost`), turned into seconds at `--gpu-tflops` sustained. With
`--cpu-forward`, one forward of that model is also timed here on the CPU, in float32 with random
weights, which checks the FLOP count against a measured rate.

    python benchmarks/evaluate_cost.py --model runs/demo/model --out runs/bench/evaluate_cost.json
    python benchmarks/evaluate_cost.py --model runs/demo/model --cpu-forward --out evaluate_cost.json

Writes JSON: per task the measured seconds per 10k samples (generation, scoring) and the start-up,
and per task the estimate (FLOPs per sample, GPU hours per 10k samples, and CPU hours where timed).
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from jobs.evaluate import run
from omniflow.config import load_config
from omniflow.modality import Modality
from omniflow.presets import build_transformer, get_preset, model_cost
from omniflow.sampling import guidance_branches
from omniflow.tasks import get_task
from pipelines.evaluation.config import EvaluateConfig, pairs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "evaluate_shapesworld.yaml"
TASKS = ("t2i", "i2t", "t2a", "a2t", "i2a", "a2i")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--model", default="runs/demo/model", help="a ShapesWorld model directory to measure")
    parser.add_argument("--config", default=str(CONFIG), help="the evaluation config measured")
    parser.add_argument("--small", type=int, default=20, help="rows per benchmark set in the first run")
    parser.add_argument("--large", type=int, default=420, help="rows per benchmark set in the second run")
    parser.add_argument("--preset", default="sd3-medium", help="the model size of the estimate")
    parser.add_argument("--steps", type=int, default=28, help="sampler steps of the estimate (the release's default)")
    parser.add_argument("--image-latent", type=int, default=None,
                        help="the image latents' side (default the preset's: 128, 1024 x 1024 images; 64 for 512)")
    parser.add_argument("--gpu-tflops", type=float, default=400.0,
                        help="sustained TFLOP/s assumed for the GPU (400: an H100's 989 bf16 peak at 40%%)")
    parser.add_argument("--cpu-forward", action="store_true", help="time one forward of the preset on this CPU")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, output: Path) -> dict:
    """Per task: seconds per 10k samples of generation and scoring, and the start-up."""
    runs = {}
    sets = len(load_config(EvaluateConfig, args.config).benchmarks)
    for rows in (args.small, args.large):
        overrides = [f"model={args.model}", f"output={output / str(rows)}"]
        config = load_config(EvaluateConfig, args.config, overrides + [f"benchmarks.{i}.source.samples={rows}"
                                                                        for i in range(sets)])
        started = time.perf_counter()
        manifest = run(config)
        runs[rows] = {"timings": manifest["timings"], "wall_s": time.perf_counter() - started}
    small, large = (runs[n]["timings"] for n in (args.small, args.large))
    extra = args.large - args.small
    per_task = {}
    for bench, task in pairs(config):
        phases = {what: f"{verb} {bench.name}/{task}" for what, verb in (("generate", "generating"),
                                                                         ("score", "scoring"))}
        per_sample = {what: (large[p] - small[p]) / extra for what, p in phases.items()}
        per_task[task] = {f"{what}_s_per_10k": round(s * 10_000, 1) for what, s in per_sample.items()}
        # what the small run spent beyond its rows' share: Ray stages, actors, loading models
        per_task[task]["startup_s"] = round(sum(small[p] - per_sample[w] * args.small for w, p in phases.items()), 1)
    return {"rows": [args.small, args.large], "steps": config.sampling.steps, "tasks": per_task,
            "wall_s": {str(n): round(r["wall_s"], 1) for n, r in runs.items()}}


def _shapes(args: argparse.Namespace):
    preset = get_preset(args.preset)
    shapes = dict(preset.latent_shapes())
    if args.image_latent:
        shapes[Modality.IMAGE] = (shapes[Modality.IMAGE][0], args.image_latent, args.image_latent)
    return preset, shapes


def estimate(args: argparse.Namespace) -> dict:
    """Per task: the sampler's FLOPs per sample at the preset's size, and what they cost."""
    preset, shapes = _shapes(args)
    out = {}
    for name in TASKS:
        task = get_task(name)
        present = {m.value: shapes[m] for m in (*task.targets, *task.conditions, *task.absent)}
        branches = len(guidance_branches(task.conditions, 4.0))
        flops = model_cost(preset.config, present).forward_flops * branches * args.steps
        out[name] = {"guidance_branches": branches, "tflops_per_sample": round(flops / 1e12, 1),
                     "gpu_hours_per_10k": round(flops * 10_000 / (args.gpu_tflops * 1e12) / 3600, 2)}
    return {"preset": args.preset, "latent_shapes": {m.value: list(s) for m, s in shapes.items()},
            "steps": args.steps, "gpu_tflops": args.gpu_tflops, "tasks": out}


def cpu_forward(args: argparse.Namespace, estimated: dict) -> dict:
    """One forward of the preset on this CPU (t2i's inputs, its guidance branches as the batch)."""
    preset, shapes = _shapes(args)
    model = build_transformer(args.preset).eval()
    task = get_task("t2i")
    batch = estimated["tasks"]["t2i"]["guidance_branches"]
    latents = {m.value: torch.randn(batch, *shapes[m]) for m in (*task.targets, *task.conditions, *task.absent)}
    times = {m: torch.rand(batch) for m in latents}
    with torch.inference_mode():
        started = time.perf_counter()
        model(latents, times)
        seconds = time.perf_counter() - started
    flops = model_cost(preset.config, {m: shapes[Modality(m)] for m in latents}).forward_flops * batch
    per_sample = seconds * args.steps
    return {"t2i_forward_s": round(seconds, 2), "measured_gflops_per_s": round(flops / seconds / 1e9, 1),
            "t2i_cpu_hours_per_10k": round(per_sample * 10_000 / 3600, 1), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(args, Path(tmp))
    estimated = estimate(args)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__},
              "measured_shapesworld": measured, "estimated": estimated}
    if args.cpu_forward:
        result["estimated"]["cpu"] = cpu_forward(args, estimated)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
