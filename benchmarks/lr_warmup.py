"""Does the warm-up's first step matter? The toy image VAE trained with the project's schedule
(`omniflow.lr.warmup_cosine`: step s of the warm-up at (s + 1) / warmup) and with transformers'
cosine-with-warm-up (s / warmup: the first step at learning rate 0), everything else the default
build, then decode(encode(x)) of held-out scenes read back by the ShapesWorld checkers.

    python benchmarks/lr_warmup.py --out runs/bench/lr_warmup.json

About a minute and a half on 2 CPU cores. The result is why `omniflow.lr` is kept.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from omniflow.codecs import autoencoder, build_codec
from omniflow.lr import warmup_cosine
from shapesworld.checkers import concept_accuracy, read_image
from shapesworld.toy import codecs as toy


def from_zero(step: int, *, total: int, warmup: int, floor: float = 0.1) -> float:
    """transformers' `get_cosine_with_min_lr_schedule_with_warmup` factor (min_lr_rate = floor)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


SCHEDULES = {"project": warmup_cosine, "transformers": from_zero}


def round_trip(schedule: str, config: toy.ToyCodecsConfig, train: toy.ShapesData, held_out: toy.ShapesData) -> dict:
    autoencoder.warmup_cosine = SCHEDULES[schedule]  # what `train_autoencoder_kl` steps by
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        codec_config = toy._build_image(Path(out), config.image, train, config.seed, log=lambda m: None)
        codec = build_codec({**codec_config, "path": str(Path(out) / codec_config["path"])})
        pixels = codec.decode(codec.encode(toy._pixels(held_out.images)))
        accuracy = concept_accuracy(read_image(codec.to_uint8(pixels)), held_out.concepts)
    return {**accuracy, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/lr_warmup.json"))
    args = parser.parse_args()
    config = toy.ToyCodecsConfig()
    train = toy.shapes_data(config.train_samples, seed=config.seed, image_size=config.image.size, mel=config.audio.mel)
    held_out = toy.shapes_data(config.eval_samples, seed=config.seed + 1, image_size=config.image.size,
                               mel=config.audio.mel)
    results = {name: round_trip(name, config, train, held_out) for name in SCHEDULES}
    autoencoder.warmup_cosine = warmup_cosine
    report = {"image_vae": config.image.model_dump(), "held_out_scenes": config.eval_samples, "round_trip": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
