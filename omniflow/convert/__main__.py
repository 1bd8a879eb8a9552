"""Command line for checkpoint conversion: `python -m omniflow.convert --help`."""

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from omniflow.convert.reference import TEXT_DECODER_PREFIX, convert_reference, load_reference_dir
from omniflow.convert.release import (
    AUDIOLDM2,
    CLIP_L,
    FLAN_T5,
    LANGUAGEBIND_AUDIO,
    release_model_dir,
)
from omniflow.convert.sd3 import transformer_from_sd3
from omniflow.modality import MODALITIES
from omniflow.transformer import TIMESTEP_SCALE, OmniFlowTransformer

FIXTURE_TOLERANCE = 1e-4
FIXTURE_MODES = {
    "joint_cond": False,
    "split_cond": True,
}  # fixture name -> split_timestep_conditioning

DESCRIPTION = """\
Convert checkpoints into OmniFlowTransformer's model directory (diffusers save_pretrained layout,
safetensors), loadable with OmniFlowTransformer.from_pretrained(OUT_DIR).

  release        the public OmniFlow release as a whole model directory that `python -m serve
                 --model OUT_DIR` serves with the release's sampling conventions: the transformer,
                 the image VAE, the text VAE (from the transformer checkpoint and Flan-T5), the
                 audio VAE (AudioLDM2's) and the pooled encoders (CLIP, LanguageBind's audio
                 tower). SRC is the release root. Public models the release loads by hub id may be
                 local directories instead (--clip-l, --t5, --audio, --languagebind).
  reference      the public OmniFlow release's transformer alone (OmniFlowTransformerModel). SRC is the release root or
                 its transformer/ folder: config.json, diffusion_pytorch_model.safetensors or .bin,
                 and for --ema ema_transformer.pt. The result computes the same function; the few
                 weights the reference never uses are dropped and listed.
  sd3            a diffusers SD3Transformer2DModel (local transformer dir, pipeline root or hub id):
                 its weights fill the image and text streams; the audio stream and the text head
                 start fresh. With audio absent the result computes SD3's image prediction.
  check-fixture  prove the reference conversion on a stored reference fixture: prints a summary,
                 then one JSON line {output: max abs error}; exits 1 if any exceeds 1e-4.
  check-pipeline-fixture
                 prove `release` end to end on a pipeline fixture (a tiny release, its inputs, and
                 what the release's own pipeline drew and produced for t2i, i2t, t2a, a2t, i2a, a2i):
                 converts it, samples every run again from the same draws, prints one line per run,
                 then one JSON line {output: relative error}; exits 1 if any exceeds 1e-4.

examples:
  python -m omniflow.convert release OmniFlow-v0.5 models/omniflow-v0.5 --ema
  python -m omniflow.convert reference OmniFlow-v0.5 models/omniflow-v0.5-transformer --ema
  python -m omniflow.convert sd3 sd3-medium-diffusers models/omniflow-sd3 --audio-init image
  python -m omniflow.convert check-fixture \\
      tests/fixtures/omniflow_reference/omniflow_ref_seed0.safetensors
  python -m omniflow.convert check-pipeline-fixture tests/fixtures/omniflow_pipeline
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m omniflow.convert",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    rel = commands.add_parser("release", help="the OmniFlow release as a model directory to serve")
    rel.add_argument("src", metavar="SRC_DIR", help="release root (transformer/, vae/, text_vae/, ...)")
    rel.add_argument("out", metavar="OUT_DIR", help="model directory to create (must not hold files)")
    rel.add_argument("--ema", action="store_true", help="the EMA weights (transformer/ema_transformer.pt)")
    rel.add_argument("--clip-l", default=CLIP_L, help=f"CLIP ViT-L/14 for pooled vectors (default: {CLIP_L})")
    rel.add_argument("--t5", default=FLAN_T5, help=f"the text VAE's encoder (default: {FLAN_T5})")
    rel.add_argument("--audio", default=AUDIOLDM2, help=f"AudioLDM2 pipeline with vae/, vocoder/ (default: {AUDIOLDM2})")
    rel.add_argument("--languagebind", default=LANGUAGEBIND_AUDIO,
                     help=f"LanguageBind's audio tower for audio pooled vectors (default: {LANGUAGEBIND_AUDIO})")
    rel.add_argument("--vocoder", default="hifigan", choices=("hifigan", "griffin-lim"),
                     help="hifigan: the AudioLDM2 pipeline's vocoder/; griffin-lim: no weights (default: hifigan)")
    rel.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    rel.add_argument("--split-timestep-conditioning", action="store_true", help="as for `reference`")

    ref = commands.add_parser("reference", help="convert the OmniFlow reference release's transformer")
    ref.add_argument("src", metavar="SRC_DIR", help="release root or its transformer/ folder")
    ref.add_argument(
        "out", metavar="OUT_DIR", help="model directory to create (must not hold files)"
    )
    ref.add_argument(
        "--split-timestep-conditioning",
        action="store_true",
        help="modulate each stream by its own timestep embedding (reference: split_cond=True); "
        "default: one summed embedding for all streams",
    )
    ref.add_argument(
        "--ema",
        action="store_true",
        help="use the EMA weights from ema_transformer.pt instead of the raw weights",
    )

    sd3 = commands.add_parser("sd3", help="start a model from an SD3 transformer")
    sd3.add_argument("src", metavar="SRC", help="SD3 transformer dir, pipeline root, or hub id")
    sd3.add_argument(
        "out", metavar="OUT_DIR", help="model directory to create (must not hold files)"
    )
    sd3.add_argument(
        "--audio-init",
        choices=("fresh", "image"),
        default="fresh",
        help="fresh: DiT-style init of the audio stream; image: copy each block's image layers",
    )
    sd3.add_argument(
        "--subfolder",
        default=None,
        help="the transformer's subfolder (default: found automatically; hub: transformer)",
    )
    sd3.add_argument(
        "--split-timestep-conditioning", action="store_true", help="as for `reference`"
    )

    check = commands.add_parser(
        "check-fixture", help="check the reference conversion against a fixture"
    )
    check.add_argument(
        "fixture", metavar="FILE.safetensors", help="fixture; its config is FILE.json beside it"
    )
    pipeline = commands.add_parser(
        "check-pipeline-fixture", help="check the release conversion end to end against a pipeline fixture"
    )
    pipeline.add_argument("fixture", metavar="FIXTURE_DIR", help="a pipeline fixture directory (manifest.json, ...)")
    pipeline.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                          help="runs to check, e.g. t2i.old i2a.new (default: all)")
    return parser


def save_model(model: OmniFlowTransformer, out_dir: Path) -> None:
    """Write `model` to `out_dir` atomically: a killed run leaves no half-written model behind."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _summarise_dropped(keys: Sequence[str]) -> list[str]:
    decoder = [k for k in keys if k.startswith(TEXT_DECODER_PREFIX)]
    lines = [k for k in keys if not k.startswith(TEXT_DECODER_PREFIX)]
    if decoder:
        lines.append(
            f"{TEXT_DECODER_PREFIX}* ({len(decoder)} tensors: the attached text VAE, a model apart)"
        )
    return lines


def run_reference(args: argparse.Namespace) -> int:
    config, state_dict = load_reference_dir(args.src, ema=args.ema)
    conversion = convert_reference(
        config, state_dict, split_timestep_conditioning=args.split_timestep_conditioning
    )
    save_model(conversion.model, Path(args.out))
    print(f"wrote {args.out} ({'EMA' if args.ema else 'raw'} weights)")
    print("dropped reference keys the reference never uses:")
    for line in _summarise_dropped(conversion.dropped_keys):
        print(f"  {line}")
    if conversion.fresh_keys:
        print(f"freshly initialised (no reference counterpart): {conversion.fresh_keys}")
    return 0


def run_release(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory")
    result = release_model_dir(
        args.src, out, ema=args.ema, clip_l=args.clip_l, t5=args.t5, audio=args.audio,
        languagebind=args.languagebind, vocoder=args.vocoder,
        resolution=args.resolution, split_timestep_conditioning=args.split_timestep_conditioning,
    )
    print(f"wrote {result.path} ({'EMA' if args.ema else 'raw'} weights); latent shapes {result.info['latent_shapes']}")
    print(f"serve it: python -m serve --model {result.path}")
    return 0


def run_sd3(args: argparse.Namespace) -> int:
    model = transformer_from_sd3(
        args.src,
        audio_init=args.audio_init,
        subfolder=args.subfolder,
        split_timestep_conditioning=args.split_timestep_conditioning,
    )
    save_model(model, Path(args.out))
    print(f"wrote {args.out} (streams {list(model.streams)}, audio init {args.audio_init!r})")
    return 0


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@torch.no_grad()
def fixture_errors(fixture: Path) -> dict[str, float]:
    """Max abs error of our converted model against each stored reference output of a fixture."""
    config_path = fixture.with_suffix(".json")
    if not fixture.is_file() or not config_path.is_file():
        raise ValueError(f"need both {fixture} and {config_path}")
    tensors = load_file(fixture)
    ref_config = json.loads(config_path.read_text())
    state_dict, inputs = _section(tensors, "state_dict."), _section(tensors, "inputs.")
    latents = {
        "image": inputs["hidden_states"],
        "text": inputs["encoder_hidden_states"],
        "audio": inputs["audio_hidden_states"],
    }
    # the fixture stores timesteps on the reference's 0..1000 scale; our model takes t in [0, 1]
    timesteps = {
        "image": inputs["timestep"] / TIMESTEP_SCALE,
        "text": inputs["timestep_text"] / TIMESTEP_SCALE,
        "audio": inputs["timestep_audio"] / TIMESTEP_SCALE,
    }
    errors = {}
    for mode, split in FIXTURE_MODES.items():
        model = convert_reference(
            ref_config, state_dict, split_timestep_conditioning=split
        ).model.eval()
        outputs = model(latents, timesteps, inputs["pooled_projections"])
        for modality in MODALITIES:
            expected = tensors[f"outputs.{mode}.{modality}"]
            errors[f"{mode}.{modality}"] = (outputs[modality] - expected).abs().max().item()
    return errors


def run_check_fixture(args: argparse.Namespace) -> int:
    errors = fixture_errors(Path(args.fixture))
    print(
        f"reference fixture {args.fixture}: max abs error per output "
        f"(tolerance {FIXTURE_TOLERANCE:g})"
    )
    for name, err in errors.items():
        print(f"  {name:18s} {err:.3e}  {'ok' if err <= FIXTURE_TOLERANCE else 'FAIL'}")
    failed = [name for name, err in errors.items() if err > FIXTURE_TOLERANCE]
    print("FAIL: " + ", ".join(failed) if failed else "all outputs match the reference")
    print(json.dumps(errors))
    return 1 if failed else 0


def run_check_pipeline_fixture(args: argparse.Namespace) -> int:
    from omniflow.convert.pipeline_fixture import PIPELINE_TOLERANCE, pipeline_fixture_errors

    print(f"pipeline fixture {args.fixture}: relative error per output (tolerance {PIPELINE_TOLERANCE:g})")
    errors = pipeline_fixture_errors(args.fixture, runs=args.runs)
    failed = [name for name, err in errors.items() if not err <= PIPELINE_TOLERANCE]
    print("FAIL: " + ", ".join(failed) if failed else "every output matches the release's pipeline")
    print(json.dumps(errors))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"release": run_release, "reference": run_reference, "sd3": run_sd3,
               "check-fixture": run_check_fixture, "check-pipeline-fixture": run_check_pipeline_fixture}[
        args.command
    ]
    try:
        return command(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
