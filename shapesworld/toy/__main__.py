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
from pydantic import BaseModel, ValidationError

from shapesworld.toy.clip import ToyClipConfig, build_toy_clip
from shapesworld.toy.codecs import ToyCodecsConfig, build_toy_codecs


def _print_codecs(out: Path, manifest: dict) -> None:
    print(f"toy codecs in {out} (config {manifest['config_hash']}, built in {manifest['seconds']['total']}s)")
    for modality, acc in manifest["round_trip"].items():
        shape = "x".join(map(str, manifest["latent_shapes"][modality]))
        print(
            f"  {modality:>5}: latents {shape:>9}  round trip concept {acc['both']:.3f} "
            f"(colour {acc['colour']:.3f}, shape {acc['shape']:.3f})"
        )
    print(json.dumps({m: a["both"] for m, a in manifest["round_trip"].items()}))


def _print_clip(out: Path, manifest: dict) -> None:
    clip_eval, aesthetic_eval = manifest["clip_eval"], manifest["aesthetic_eval"]
    tower_eval = manifest["audio_tower_eval"]
    print(f"toy CLIP in {out} (config {manifest['config_hash']}, built in {manifest['seconds']['total']}s)")
    print(f"  clip: matched vs mismatched caption AUC {clip_eval['auc']:.4f} (per image {clip_eval['per_image']:.3f})")
    print(f"  aesthetic: clean vs blank/noise AUC {aesthetic_eval['auc']:.4f} "
          f"(clean mean {aesthetic_eval['clean_mean']:.2f}, defect mean {aesthetic_eval['defect_mean']:.2f})")
    print(f"  audio tower: matched vs mismatched caption AUC {tower_eval['auc']:.4f} (per clip {tower_eval['per_clip']:.3f})")
    print(json.dumps({"clip_auc": clip_eval["auc"], "aesthetic_auc": aesthetic_eval["auc"],
                      "audio_tower_auc": tower_eval["auc"]}))


# command -> (its help, its config class, its builder, the function printing what it built)
COMMANDS = {
    "build-codecs": ("train and cache the toy codecs, print round-trip accuracy", ToyCodecsConfig, build_toy_codecs,
                     _print_codecs),
    "build-clip": ("train and cache the toy CLIP and aesthetic head, print held-out separation", ToyClipConfig,
                   build_toy_clip, _print_clip),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shapesworld.toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, config_class, _, _) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--out", type=Path, required=True, help="directory for the build and its manifest")
        command.add_argument("--config", type=Path, help=f"YAML file with {config_class.__name__} fields")
        command.add_argument("--force", action="store_true", help="rebuild even if OUT holds this config's build")
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    _, config_class, build, report = COMMANDS[args.command]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = _read_config(args.config, config_class)
    except (OSError, yaml.YAMLError, ValidationError) as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    report(args.out, build(args.out, config, force=args.force))
    return 0


def _read_config(path: Path | None, config_class: type[BaseModel]) -> BaseModel:
    """The build's config: its defaults, overridden by the YAML file's fields."""
    overrides = yaml.safe_load(path.read_text()) if path else {}
    return config_class.model_validate(overrides or {})


if __name__ == "__main__":
    sys.exit(main())
