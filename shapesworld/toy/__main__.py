"""Command line for the toy domain.

    python -m shapesworld.toy build-codecs --out runs/toy/codecs [--config toy_codecs.yaml] [--force]
    python -m shapesworld.toy build-clip --out runs/toy/clip [--config toy_clip.yaml] [--force]

`build-codecs` trains the toy image, audio and text codecs on ShapesWorld (a few minutes on two CPU
cores), prints each modality's round-trip accuracy (the share of samples whose concept the
ShapesWorld checkers read back from decode(encode(x))) and caches them in OUT: a rerun with the
same config reuses them, a changed config rebuilds. The YAML config overrides any field of
`shapesworld.toy.codecs.ToyCodecsConfig`, e.g. `image: {steps: 1000}`.

`build-clip` trains a tiny open_clip CLIP and a LAION-layout aesthetic head on ShapesWorld (under a
minute), prints how well they separate matched from mismatched pairs and clean from blank or noise
images, and caches them the same way; `jobs.curate` scores with them like with real checkpoints.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from shapesworld.toy.clip import add_build_clip_arguments, run_build_clip
from shapesworld.toy.codecs import ToyCodecsConfig, build_toy_codecs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shapesworld.toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-codecs", help="train and cache the toy codecs, print round-trip accuracy")
    build.add_argument("--out", type=Path, required=True, help="directory for the codecs and codecs.json")
    build.add_argument("--config", type=Path, help="YAML file with ToyCodecsConfig fields")
    build.add_argument("--force", action="store_true", help="rebuild even if OUT holds this config's codecs")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    build_clip = commands.add_parser(
        "build-clip", help="train and cache the toy CLIP and aesthetic head, print held-out separation"
    )
    add_build_clip_arguments(build_clip)
    args = parser.parse_args(argv)
    if args.command == "build-clip":
        return run_build_clip(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = yaml.safe_load(args.config.read_text()) if args.config else {}
        config = ToyCodecsConfig.model_validate(overrides or {})
    except (OSError, yaml.YAMLError, ValidationError) as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    manifest = build_toy_codecs(args.out, config, force=args.force)
    print(f"toy codecs in {args.out} (config {manifest['config_hash']}, built in {manifest['seconds']['total']}s)")
    for modality, acc in manifest["round_trip"].items():
        shape = "x".join(map(str, manifest["latent_shapes"][modality]))
        print(
            f"  {modality:>5}: latents {shape:>9}  round trip concept {acc['both']:.3f} "
            f"(colour {acc['colour']:.3f}, shape {acc['shape']:.3f})"
        )
    print(json.dumps({m: a["both"] for m, a in manifest["round_trip"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
