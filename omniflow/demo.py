"""Smallest end-to-end run of the model core: train briefly, save, reload, generate every task.

    python -m omniflow.demo --preset tiny --steps 200 --out runs/demo

Trains a freshly initialised transformer on synthetic latent triplets that share a hidden concept
(each modality's latents are a fixed random linear image of one low-dimensional vector, so any
modality determines the others), with a mix of every built-in task. Saves the model directory
(diffusers layout, safetensors), loads it back, generates every task with guidance on held-out
concepts and writes `summary.json`: losses, timings, model cost and, per task, the relative
error of the generated targets (1.0 = no better than a random sample of the data; 0 = exact).
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from omniflow.objective import FlowObjective, flow_loss
from omniflow.presets import PRESETS, build_transformer, model_cost
from omniflow.sampling import generate
from omniflow.tasks import BUILTIN_TASKS
from omniflow.transformer import OmniFlowTransformer


CONCEPT_DIM = 4


def make_triplets(concepts: torch.Tensor, projections: dict, shapes: dict) -> dict:
    """Latents of every modality for each concept, scaled to unit variance."""
    out = {}
    for m, shape in shapes.items():
        x = concepts @ projections[m] / math.sqrt(CONCEPT_DIM)
        out[m] = x.reshape(len(concepts), *shape)
    return out


def relative_error(generated: torch.Tensor, truth: torch.Tensor) -> float:
    """MSE to the paired truth over MSE between the truth and a shuffled copy of itself."""
    shuffled = truth.roll(1, dims=0)
    return ((generated - truth).pow(2).mean() / (shuffled - truth).pow(2).mean()).item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m omniflow.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step (default: 16)")
    parser.add_argument("--train-size", type=int, default=512, help="training concepts (default: 512)")
    parser.add_argument("--eval-size", type=int, default=64, help="held-out concepts per task (default: 64)")
    parser.add_argument("--sample-steps", type=int, default=10, help="Euler steps when generating (default: 10)")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: runs/demo)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    preset = PRESETS[args.preset]
    shapes = preset.latent_shapes()
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_transformer(args.preset).train()
    cost = model_cost(preset.config, shapes)
    print(f"[demo] preset {preset.name}: {cost.parameters:,} parameters, "
          f"{cost.train_flops / 1e6:.1f} MFLOPs per training sample")

    data_gen = torch.Generator().manual_seed(args.seed)
    projections = {m: torch.randn(CONCEPT_DIM, math.prod(s), generator=data_gen) for m, s in shapes.items()}
    dataset = make_triplets(torch.randn(args.train_size, CONCEPT_DIM, generator=data_gen), projections, shapes)
    held_out = make_triplets(torch.randn(args.eval_size, CONCEPT_DIM, generator=data_gen), projections, shapes)
    tasks = list(BUILTIN_TASKS.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = FlowObjective()
    history = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.tensor(rng.sample(range(args.train_size), args.batch_size))
        batch_tasks = [rng.choice(tasks) for _ in idx]
        out = flow_loss(model, {m: x[idx] for m, x in dataset.items()}, batch_tasks, objective=objective)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(out.loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            recent = sum(history[-20:]) / len(history[-20:])
            print(f"[demo] step {step}/{args.steps} loss {recent:.4f} ({time.perf_counter() - start:.1f}s)")
    train_seconds = time.perf_counter() - start

    model_dir = args.out / "model"
    model.save_pretrained(model_dir)
    model = OmniFlowTransformer.from_pretrained(model_dir).eval()
    print(f"[demo] saved and reloaded {model_dir}")

    samples = {}
    for name, task in BUILTIN_TASKS.items():
        t0 = time.perf_counter()
        result = generate(
            model,
            task,
            conditions={m.value: held_out[m] for m in task.conditions},
            target_shapes={m.value: shapes[m] for m in task.targets},
            batch_size=args.eval_size,
            steps=args.sample_steps,
            guidance=args.guidance,
            generator=torch.Generator().manual_seed(args.seed),
        )
        errors = {}
        if task.conditions:  # with no condition there is no single right answer
            errors = {m.value: round(relative_error(x, held_out[m]), 4) for m, x in result.items()}
        samples[name] = {"seconds": round(time.perf_counter() - t0, 3), "relative_error": errors}
        print(f"[demo] {name:>5}: {args.eval_size} samples in {samples[name]['seconds']}s, relative error {errors}")

    summary = {
        "preset": preset.name,
        "parameters": cost.parameters,
        "train_flops_per_sample": cost.train_flops,
        "train_steps": args.steps,
        "train_seconds": round(train_seconds, 2),
        "loss_first": history[0],
        "loss_last_20": sum(history[-20:]) / len(history[-20:]),
        "samples": samples,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] wrote {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
