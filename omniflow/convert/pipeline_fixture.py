"""Hold a converted release to the released pipeline's own outputs, end to end.

A pipeline fixture (tests/fixtures/omniflow_pipeline, its README says how it was made) holds a tiny
random release in the release's layout, the inputs, and for each run (task and `cfg_mode`) every
random tensor the release's pipeline drew and the target latents it ended with. Here the release is
converted (`omniflow.convert.release`), loaded with the `reference` conventions ('old' runs) or
with `dropped_condition: noise` ('new' runs), and each run is sampled again from the same inputs
and the same draws: the starting noise of targets and absent modalities, the posterior samples of
image and audio conditions, and in 'new' runs the noise that stands for a dropped condition.

Errors are relative: the largest absolute difference over the largest absolute value of the
release's tensor, per output (the tiny random transformer's outputs reach tens).
"""

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from omniflow.convert.release import release_model_dir
from omniflow.inference import AnyToAny, InputPreparer
from omniflow.modality import Modality
from omniflow.sampling import generate
from omniflow.tasks import get_task

PIPELINE_TOLERANCE = 1e-4
CFG_MODES = {"old": {"profile": "reference"}, "new": {"profile": "reference", "dropped_condition": "noise"}}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(1e-12)).item()


def convert_fixture_release(fixture: Path, out: Path) -> Path:
    """The fixture's release as a model directory, its public models taken from the fixture."""
    components = fixture / "components"
    audioldm2 = out.parent / "audioldm2"
    shutil.copytree(components / "audio_vae", audioldm2 / "vae")  # an AudioLDM2 pipeline's layout
    resolution = json.loads((fixture / "manifest.json").read_text())["crop_size"]
    return release_model_dir(components / "release", out, clip_l=str(components / "clip_l"),
                             t5=str(components / "flan_t5"), audio=str(audioldm2),
                             languagebind=str(components / "languagebind_audio"), vocoder="griffin-lim",
                             resolution=resolution, log=lambda _: None).path


def _draws(run: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {d["role"]: tensors[d["key"]] for d in run["draws"] if d.get("value_stored")}


def _posterior_sample(pipe: AnyToAny, modality: Modality, value: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A condition's latent from the posterior sample mean + std * eps, normalised as the codec does."""
    codec = pipe.codecs[modality]
    vae_input = value * 2 - 1 if modality == Modality.IMAGE else codec.log_mel(value)
    posterior = codec.vae.encode(vae_input.to(codec.device, codec.dtype)).latent_dist
    return codec.norm.normalise(posterior.mean + posterior.std * eps.to(posterior.mean))


def _null_text_noise(draw: torch.Tensor, latent_dim: int, tokens: int) -> torch.Tensor:
    """The release's 'new' stand-in for a dropped caption: noise over the whole text stream, whose
    text-latent tokens keep zero padding past the latent width."""
    noise = draw.clone()
    noise[-tokens:, latent_dim:] = 0
    return noise[None]


@torch.no_grad()
def run_errors(pipe: AnyToAny, inputs: Mapping[Modality, Any], run: Mapping[str, Any],
               tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> dict[str, float]:
    """One run sampled again as the fixture says; output name -> relative error."""
    task = get_task(run["task"])
    draws = _draws(run, tensors)
    given = {**inputs, Modality.TEXT: run["prompt"]}
    conditions, pooled = pipe.encode_conditions(task, [given])
    for m in task.conditions:
        if f"posterior.{m.value}" in draws:
            value = torch.from_numpy(given[m].value)[None]
            conditions[m.value] = _posterior_sample(pipe, m, value, draws[f"posterior.{m.value}"])
    noise = {m.value: draws[f"noise.{m.value}"] for m in (*task.targets, *task.absent) if f"noise.{m.value}" in draws}
    for m in task.conditions:
        null = draws.get(f"null.{m.value}")
        if null is not None:
            latent_dim = pipe.latent_shapes[Modality.TEXT][-1]
            noise[m.value] = (_null_text_noise(null, latent_dim, pipe.latent_shapes[Modality.TEXT][0])
                              if m == Modality.TEXT else null[None])
    out = generate(pipe.model, task, conditions=conditions, pooled=pooled, batch_size=1,
                   target_shapes={m.value: pipe.latent_shapes[m] for m in task.targets},
                   steps=manifest["num_inference_steps"], shift=3.0, guidance=manifest["guidance_scale"],
                   noise=noise, **pipe.left_out(task))
    (target,) = task.targets
    errors = {f"{run['name']}.latents": relative_error(out[target], tensors["summary.final_latents"])}
    if target == Modality.IMAGE:
        image = pipe.codecs[target].decode(out[target]).permute(0, 2, 3, 1)
        errors[f"{run['name']}.image"] = relative_error(image, tensors["summary.decoded"])
    elif target == Modality.AUDIO:
        errors[f"{run['name']}.log_mel"] = relative_error(pipe.codecs[target].decode_mel(out[target]),
                                                          tensors["summary.decoded"])
    return errors


def pipeline_fixture_errors(fixture: str | Path, *, runs: list[str] | None = None,
                            log: Callable[[str], None] = print) -> dict[str, float]:
    """Convert the fixture's release and sample each of its runs again (all by default)."""
    fixture = Path(fixture)
    manifest = json.loads((fixture / "manifest.json").read_text())
    names = runs or list(manifest["runs"])
    unknown = sorted(set(names) - set(manifest["runs"]))
    if unknown:
        raise ValueError(f"{fixture} has no runs {unknown}; it has {sorted(manifest['runs'])}")
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = convert_fixture_release(fixture, Path(tmp) / "model")
        pipes: dict[str, AnyToAny] = {}
        for name in names:
            run = {**manifest["runs"][name], "name": name}
            mode = run["cfg_mode"]
            if mode not in pipes:
                pipes[mode] = AnyToAny.load(model_dir, conventions=CFG_MODES[mode])
            pipe = pipes[mode]
            prepare = InputPreparer(pipe.info["codecs"])
            inputs = prepare(image=(fixture / "inputs" / "input_image.png").read_bytes(),
                             audio=(fixture / "inputs" / "input_audio.wav").read_bytes())
            found = run_errors(pipe, inputs, run, load_file(fixture / f"{name}.safetensors"), manifest)
            log("  ".join(f"{k} {v:.2e}" for k, v in found.items()))
            errors.update(found)
    return errors
