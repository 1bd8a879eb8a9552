"""CLIP + aesthetic scoring throughput: the Ray Data stages against the same model in one process.

Both paths score the same encoded images and captions at the same batch size: the bare path
decodes, preprocesses and runs the model batch after batch in this process; the Ray path runs
`ClipPreprocess` (CPU actors) -> `ClipScorer` (model actors) on a local cluster. Writes JSON with
both rates (images/s) and their ratio; the Ray numbers include actor start-up (each actor loads the
model), and `ray.steady_images_per_s` subtracts it (measured by a one-batch run).

    python benchmarks/clip_scoring.py --out runs/bench/clip_scoring.json            # toy CLIP
    python benchmarks/clip_scoring.py --model-name ViT-L-14-quickgelu --pretrained weights/vit-l-14.pt \
        --image-size 256 --device cuda --scorer-gpus 1 --out clip_l14.json
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import open_clip
import pyarrow as pa
import ray
import torch

from omniflow.codecs.media import decode_image, encode_image
from omniflow.scoring.aesthetic import load_aesthetic_head
from omniflow.scoring.clip import ClipConfig, load_clip
from pipelines.scorers import ClipScoringConfig, add_clip_scoring, resolve_device
from shapesworld import all_concepts, render_captions, render_images, sample_concepts, sample_scenes
from shapesworld.toy.clip import build_toy_clip, toy_scoring_configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="side of the encoded ShapesWorld images")
    parser.add_argument(
        "--toy-dir", type=Path, default=Path("runs/toy/clip"), help="toy CLIP cache (built if absent)"
    )
    parser.add_argument("--model-name", help="an open_clip model instead of the toy CLIP")
    parser.add_argument("--pretrained", help="tag or checkpoint file for --model-name; omit for random weights")
    parser.add_argument("--config-file", help="open_clip model config JSON for a custom --model-name")
    parser.add_argument("--aesthetic", help="LAION v2 head weights for --model-name (optional)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    parser.add_argument("--preprocess-actors", type=int, default=1)
    parser.add_argument("--scorer-actors", type=int, default=1)
    parser.add_argument("--scorer-gpus", type=float, default=0.0)
    return parser.parse_args(argv)


def scoring_config(args: argparse.Namespace) -> ClipScoringConfig:
    if args.model_name:
        clip = ClipConfig(model_name=args.model_name, pretrained=args.pretrained, config_file=args.config_file)
        aesthetic = {"version": "v2", "weights": args.aesthetic} if args.aesthetic else None
    else:
        build_toy_clip(args.toy_dir, log=lambda msg: None)
        clip, aesthetic = toy_scoring_configs(args.toy_dir)
    return ClipScoringConfig(
        clip=clip, aesthetic=aesthetic,
        preprocess={
            "batch_size": args.batch_size, "concurrency": args.preprocess_actors, "num_cpus": 1, "device": "cpu",
        },
        scorer={
            "batch_size": args.batch_size, "concurrency": args.scorer_actors, "num_cpus": 1,
            "num_gpus": args.scorer_gpus, "device": args.device,
        },
    )


def bare_forward(config: ClipScoringConfig, images: list[bytes], captions: list[str], batch_size: int) -> dict:
    """Decode, preprocess and score batch after batch in this process (the model loaded beforehand)."""
    device = resolve_device(config.scorer.device)
    clip = load_clip(config.clip, device=device)
    head = load_aesthetic_head(config.aesthetic).to(device) if config.aesthetic else None

    @torch.inference_mode()
    def score(lo: int, hi: int) -> None:
        pixels = torch.stack([clip.preprocess(decode_image(data)) for data in images[lo:hi]])
        embeds = clip.embed_images(pixels)
        clip.similarity(embeds, clip.embed_texts(captions[lo:hi])).cpu()
        if head is not None:
            head(embeds).cpu()

    score(0, batch_size)  # warm-up
    start = time.perf_counter()
    for lo in range(0, len(images), batch_size):
        score(lo, lo + batch_size)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }


def ray_pipeline(config: ClipScoringConfig, table: pa.Table, batch_size: int) -> dict:
    """Wall time of the two stages over `table`, and of a one-batch run (actor start-up)."""

    def run(rows: pa.Table) -> float:
        ds = ray.data.from_arrow(rows).repartition(max(1, rows.num_rows // batch_size))
        ds = add_clip_scoring(ds.materialize(), config)
        start = time.perf_counter()
        for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass
        return time.perf_counter() - start

    startup = run(table.slice(0, batch_size))
    seconds = run(table)
    n = table.num_rows
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "startup_s": round(startup, 2),
        "steady_images_per_s": round((n - batch_size) / max(seconds - startup, 1e-9), 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = scoring_config(args)
    scenes = sample_scenes(sample_concepts(args.images, seed=0, pairs=all_concepts()), seed=0)
    images = [encode_image(a) for a in render_images(scenes, size=args.image_size)]
    captions = render_captions(scenes)
    table = pa.table({
        "key": [str(i) for i in range(args.images)], "image": pa.array(images, pa.binary()), "caption": captions,
        "reject_stage": pa.nulls(args.images, pa.string()), "reject_reason": pa.nulls(args.images, pa.string()),
    })

    bare = bare_forward(config, images, captions, args.batch_size)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="ray-", ignore_cleanup_errors=True) as temp_dir:
        ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            distributed = ray_pipeline(config, table, args.batch_size)
        finally:
            ray.shutdown()

    result = {
        "model": config.clip.model_name,
        "aesthetic": config.aesthetic is not None,
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": str(resolve_device(config.scorer.device)),
        "cpus": args.cpus,
        "actors": {"preprocess": args.preprocess_actors, "scorer": args.scorer_actors},
        "bare": bare,
        "ray": distributed,
        "ratio": round(distributed["images_per_s"] / bare["images_per_s"], 3),
        "steady_ratio": round(distributed["steady_images_per_s"] / bare["images_per_s"], 3),
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
