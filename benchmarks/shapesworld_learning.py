"""How fast and how far the OmniFlow transformer learns ShapesWorld: learning curves under control.

Each arm trains a fresh transformer in this process (no Ray: `omniflow.training.train_step` on
latents held in memory) and measures, every `--eval-every` steps, the any-to-any quality of the
tasks it trains on held-out scenes (`shapesworld.quality.evaluate`: the demo's measure,
with fewer samples). Arms differ by `key=value` settings of `LearningConfig` (`shapesworld.toy.learning.LearningConfig`: tasks and their mix, model
overrides, objective, optimiser, grouped batches, pooled conditioning vectors, held-out concepts,
sampling), so one run compares them at equal steps and seconds.

    python benchmarks/shapesworld_learning.py --out runs/bench/learning \\
        --arm mix --arm t2i tasks=t2i --arm mix-shift1 objective.timesteps.shift='{image: 1, text: 1, audio: 1}'
    python benchmarks/shapesworld_learning.py --out runs/bench/pooled --arm i2t tasks=i2t \\
        --arm i2t-pooled tasks=i2t 'pooled=[image,text]'
    python benchmarks/shapesworld_learning.py --out runs/bench/probes --probes-only

`pooled=[image,text,audio]` conditions on the toy CLIP's image and text vectors and its audio
tower's (`--clip`), as OmniFlow conditions on CLIP's and LanguageBind's; `held_out_concepts=3` trains without three colour-shape pairs and scores them
apart (dashed in the plot).

`--probes` also fits linear and one-hidden-layer MLP probes (colour, shape) on each modality's latents and reads captions
the text VAE decodes from noised text latents: whether the latents carry the concept at all.

Writes `<out>/learning.json` (per arm: steps, seconds, loss, and per task both / colour / shape at
each evaluation, written as it goes; probes) and `<out>/learning.png` (the curves).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from omniflow.codecs import build_codec
from omniflow.config import load_config
from omniflow.flow import interpolate
from omniflow.modality import Modality
from shapesworld import COLOURS, SHAPES, concept_accuracy, read_caption
from shapesworld.quality import EVAL_TASKS
from shapesworld.toy.clip import ToyClipConfig, build_toy_clip, toy_pooled_configs
from shapesworld.toy.codecs import (
    ToyCodecsConfig,
    build_toy_codecs,
    load_toy_codecs,
    toy_codec_configs,
)
from shapesworld.toy.learning import LearningConfig, encode_scenes, sampling_sweep, train


def cached_scenes(codecs: dict, codecs_dir: Path, n: int, seed: int, cache: Path, pooled: dict | None = None,
                  clip_dir: Path | None = None) -> dict:
    manifest = json.loads((codecs_dir / "codecs.json").read_text())
    key = manifest["config_hash"]
    if pooled:
        key += "-pooled-" + json.loads((clip_dir / "clip.json").read_text())["config_hash"]
    path = cache / f"scenes-{key}-{n}-{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    start = time.perf_counter()
    scenes = encode_scenes(codecs, n, seed, pooled=pooled)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(scenes, path)
    print(f"encoded {n} training scenes in {time.perf_counter() - start:.1f} s", flush=True)
    return scenes


# ---- probes ------------------------------------------------------------------------------------

def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              classes: int, *, steps: int = 300, weight_decay: float = 1e-3, hidden: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features (with
    `hidden` > 0, of a one-hidden-layer MLP of that width)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], classes) if not hidden else torch.nn.Sequential(
        torch.nn.Linear(x_train.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x_train), y_train)
        loss = loss + weight_decay * sum(p.pow(2).sum() for p in probe.parameters() if p.ndim == 2)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((probe(x_test).argmax(1) == y_test).float().mean())


def probes(codecs: dict, fit: dict, test: dict) -> dict:
    """Colour and shape read linearly from each modality's latents; captions decoded from noised
    text latents, read by the caption checker."""
    labels = {
        "colour": (lambda c: COLOURS.index(c.colour), len(COLOURS)),
        "shape": (lambda c: SHAPES.index(c.shape), len(SHAPES)),
    }
    out: dict = {"linear": {}, "mlp": {}, "text_decoded_from_noised": {}}
    for m in ("image", "text", "audio"):
        x_train, x_test = fit["latents"][m].flatten(1), test["latents"][m].flatten(1)
        for kind, hidden in (("linear", 0), ("mlp", 256)):
            out[kind][m] = {
                name: round(fit_probe(x_train, torch.tensor([f(c) for c in fit["concepts"]]),
                                      x_test, torch.tensor([f(c) for c in test["concepts"]]), k, hidden=hidden), 3)
                for name, (f, k) in labels.items()
            }
    text = codecs[Modality.TEXT]
    x0 = test["latents"]["text"]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator)
    for t in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5):
        noised = interpolate(x0, noise, torch.full((len(x0),), t))
        with torch.inference_mode():
            captions = text.decode(noised)
        out["text_decoded_from_noised"][f"t{t:g}"] = concept_accuracy(read_caption(captions), test["concepts"])
    return out


# ---- training arms -----------------------------------------------------------------------------

def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in results for p in r["curve"] for t in p["tasks"]}, key=EVAL_TASKS.index)
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), sharey=True, squeeze=False)
    handles = {}
    for ax, task in zip(axes[0], tasks):
        for i, r in enumerate(results):  # one colour per arm in every panel
            name = r["config"]["name"]
            points = [p for p in r["curve"] if task in p["tasks"]]
            if points:
                handles[name], = ax.plot([p["step"] for p in points], [p["tasks"][task]["both"] for p in points],
                                         marker="o", color=f"C{i}", label=name)
            held = [p for p in r["curve"] if task in p.get("held_out_tasks", {})]
            if held:
                label = f"{name} (held-out concepts)"
                handles[label], = ax.plot([p["step"] for p in held], [p["held_out_tasks"][task]["both"] for p in held],
                                          marker="x", linestyle="--", color=f"C{i}", label=label)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("both (colour and shape right)")
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--codecs", type=Path, default=Path("runs/toy/codecs"), help="toy codecs (built here if absent)")
    p.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="an arm: its name, then settings of `LearningConfig` as key=value (repeat for more arms)")
    p.add_argument("--clip", type=Path, default=Path("runs/toy/clip"),
                   help="toy CLIP and audio tower (built here if absent) whose vectors condition arms with pooled=[...]")
    p.add_argument("--train-scenes", type=int, default=4000, help="distinct training scenes encoded once")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=60, help="held-out scenes per task at each evaluation")
    p.add_argument("--sweep", metavar="STEPS/GUIDANCE/SHIFT,...",
                   help="after training, evaluate each arm under these sampler settings too, e.g. 10/2/3,20/4/3")
    p.add_argument("--probes", action="store_true", help="fit linear and MLP probes on the latents first")
    p.add_argument("--probes-only", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    build_toy_codecs(args.codecs, ToyCodecsConfig())
    codecs = load_toy_codecs(args.codecs)
    codec_configs = toy_codec_configs(args.codecs)
    arms = [load_config(LearningConfig, {"name": name}, overrides) for name, *overrides in args.arm]
    pooled = {}
    if any(arm.pooled for arm in arms):
        build_toy_clip(args.clip, ToyClipConfig())
        pooled = {m: build_codec(c) for m, c in toy_pooled_configs(args.clip).items()}
    scenes = cached_scenes(codecs, args.codecs, args.train_scenes, seed=0, cache=args.out / "cache", pooled=pooled,
                           clip_dir=args.clip)
    report: dict = {"benchmark": "shapesworld_learning", "train_scenes": args.train_scenes,
                    "eval_samples": args.eval_samples, "threads": args.threads,
                    "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}}
    if args.probes or args.probes_only:
        test = encode_scenes(codecs, 1000, seed=7)
        fit = {"latents": {m: x[:3000] for m, x in scenes["latents"].items()}, "concepts": scenes["concepts"][:3000]}
        report["probes"] = probes(codecs, fit, test)
        print(json.dumps(report["probes"], indent=1), flush=True)
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for arm in arms if not args.probes_only else []:

        def save(partial: dict) -> None:
            report["arms"] = [*results, partial]
            (args.out / "learning.json").write_text(json.dumps(report, indent=1))
            plot(report["arms"], args.out / "learning.png")

        result, model = train(arm, codecs, codec_configs, scenes, eval_every=args.eval_every,
                              eval_samples=args.eval_samples, log=lambda m: print(m, flush=True), on_point=save,
                              pooled=pooled)
        if args.sweep:
            grid = [dict(zip(("steps", "guidance", "shift"), map(float, g.split("/")))) for g in args.sweep.split(",")]
            grid = [{**g, "steps": int(g["steps"])} for g in grid]
            result["sampling_sweep"] = sampling_sweep(arm, model, codecs, codec_configs, args.eval_samples, grid,
                                                      log=lambda m: print(m, flush=True), pooled=pooled)
        results.append(result)
        report["arms"] = results
        (args.out / "learning.json").write_text(json.dumps(report, indent=1))
        plot(results, args.out / "learning.png")
    (args.out / "learning.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
