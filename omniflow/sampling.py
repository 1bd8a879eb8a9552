"""Euler ODE sampler over per-modality schedules, with classifier-free and multi-modal guidance.

Every guidance branch of a step goes through one batched forward. A branch keeps some conditions
clean (t = 0) and replaces the others by noise at t = 1 (the released OmniFlow's
`cfg_mode='new'`), or by given "unconditional" latents at t = 0 (its default `cfg_mode='old'`: the
empty prompt's text latent, the latent of a zero image or mel); its pooled vector is that of its
first kept condition in `POOLED_PRIORITY` (zeros, or a given null input's vector, when none is
kept). Absent modalities are left
out, fed as noise at t = 1, or fed given latents at t = 1 (the released pipeline gives i2a and a2i
the prompt's text latent there).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from omniflow.flow import euler_step, sigma_schedule, velocity_from_x0
from omniflow.guidance import classifier_free_guidance, multimodal_guidance
from omniflow.modality import Modality, parse_modality
from omniflow.tasks import POOLED_PRIORITY, Task, get_task
from omniflow.transformer import PREDICTION, OmniFlowTransformer

Guidance = float | Mapping[str, float]


@dataclass(frozen=True)
class Branch:
    """A guidance branch: the conditions it keeps."""

    name: str
    kept: frozenset[Modality]


def guidance_branches(conditions: Sequence[Modality], guidance: Guidance) -> list[Branch]:
    """The branches a guidance setting needs, the fully conditioned one first."""
    everything = Branch("all", frozenset(conditions))
    if not conditions:
        return [everything]
    if not isinstance(guidance, Mapping):
        return [everything] if guidance == 1.0 else [everything, Branch("none", frozenset())]
    weights = {parse_modality(m): w for m, w in guidance.items()}
    unknown = set(weights) - set(conditions)
    if unknown:
        raise ValueError(f"guidance weights for {sorted(unknown)}, which are not conditions of this task")
    active = [m for m in conditions if weights.get(m, 1.0) != 1.0]
    if not active:
        return [everything]
    branches = [everything, Branch("none", frozenset())]
    if len(conditions) > 1:
        branches += [Branch(f"only_{m}", frozenset({m})) for m in active]
    return branches


def combine_branches(v: Mapping[str, torch.Tensor], conditions: Sequence[Modality], guidance: Guidance) -> torch.Tensor:
    """Apply the guidance rule to the velocity of each branch."""
    if "none" not in v:
        return v["all"]
    if not isinstance(guidance, Mapping):
        return classifier_free_guidance(v["none"], v["all"], guidance)
    weights = {parse_modality(m): w for m, w in guidance.items()}
    v_only = {m: v.get(f"only_{m}", v["all"]) for m in conditions}
    return multimodal_guidance(v["all"], v["none"], v_only, weights)


def _per_modality(value: float | Mapping[str, float], modalities: Sequence[Modality]) -> dict[Modality, float]:
    if isinstance(value, Mapping):
        value = {parse_modality(m): v for m, v in value.items()}
        return {m: value.get(m, 1.0) for m in modalities}
    return {m: float(value) for m in modalities}


@torch.no_grad()
def generate(
    model: OmniFlowTransformer,
    task: str | Task,
    *,
    conditions: Mapping[str, torch.Tensor] | None = None,
    target_shapes: Mapping[str, Sequence[int]],
    batch_size: int | None = None,
    pooled: Mapping[str, torch.Tensor] | None = None,
    steps: int = 28,
    shift: float | Mapping[str, float] = 3.0,
    guidance: Guidance = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    absent_shapes: Mapping[str, Sequence[int]] | None = None,
    absent_latents: Mapping[str, torch.Tensor] | None = None,
    unconditional: Mapping[str, torch.Tensor] | None = None,
    null_pooled: Mapping[str, torch.Tensor] | None = None,
    noise: Mapping[str, torch.Tensor] | None = None,
) -> dict[Modality, torch.Tensor]:
    """Generate a task's target latents by Euler integration from t = 1 to t = 0.

    Args:
        task: a built-in task name or a `Task`.
        conditions: modality -> clean latents (B, ...) for each of the task's conditions.
        target_shapes: modality -> latent shape without the batch dim, for each target.
        batch_size: needed only when the task has no conditions.
        pooled: modality -> pooled vector (B, <= pooled_projection_dim) of a condition.
        steps: Euler steps; every target uses the same count.
        shift: SD3 schedule shift, one value or one per target modality.
        guidance: one classifier-free guidance weight, or one weight per condition modality
            (the multi-modal rule; see `omniflow.guidance.multimodal_guidance`).
        generator: the only source of randomness; equal seeds give equal outputs. A sequence holds
            one generator per sample: each sample's noise is then drawn from its own generator
            alone, so a sample does not depend on the others in its batch (what batched serving
            needs).
        absent_shapes: modality -> shape without batch for absent modalities to feed as noise at
            t = 1 (the reference's training); absent modalities not listed are skipped.
        absent_latents: modality -> latents (1 or B, ...) to feed an absent modality at t = 1
            instead of noise (the released pipeline's i2a / a2i feed the prompt's text latent).
        unconditional: condition modality -> latents (1 or B, ...) that stand for the condition in
            branches that drop it, at t = 0 (`cfg_mode='old'`); conditions not listed are dropped
            as noise at t = 1.
        null_pooled: condition modality -> pooled vector (1 or B, <= pooled_projection_dim) for the
            branch that keeps no condition, instead of zeros; the first of the task's conditions in
            `POOLED_PRIORITY` that has one is used.
        noise: modality -> noise (1 or B, ...) to use instead of drawing it: a target's starting
            point (diffusers' `latents=`), the stand-in of a condition that a branch drops, an
            absent modality's input. Nothing is drawn for a modality given here.

    Example:
        >>> out = generate(model, "t2i", conditions={"text": text_latents},
        ...                target_shapes={"image": (4, 8, 8)}, steps=10, guidance=4.0)
    """
    task = get_task(task)
    conditions = {parse_modality(m): x for m, x in (conditions or {}).items()}
    pooled = {parse_modality(m): x for m, x in (pooled or {}).items()}
    missing = [m for m in task.conditions if m not in conditions]
    if missing:
        raise ValueError(f"task {task.name!r} needs conditions {missing}")
    missing = [m for m in task.targets if m not in target_shapes]
    if missing:
        raise ValueError(f"task {task.name!r} needs target shapes for {missing}")
    if conditions:
        batch_size = next(iter(conditions.values())).shape[0]
    elif batch_size is None:
        raise ValueError("batch_size is required when the task has no conditions")
    per_sample = generator is not None and not isinstance(generator, torch.Generator)
    if per_sample and len(generator) != batch_size:
        raise ValueError(f"{len(generator)} generators for a batch of {batch_size}; give one per sample")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    def draw(shape: Sequence[int]) -> torch.Tensor:
        if per_sample:
            draws = [torch.randn((1, *shape), generator=g, device=g.device) for g in generator]
            return torch.cat(draws).to(device, dtype)
        draw_on = generator.device if generator is not None else device
        return torch.randn((batch_size, *shape), generator=generator, device=draw_on).to(device, dtype)

    def per_sample_of(given: Mapping[str, torch.Tensor] | None, allowed: Sequence[Modality], what: str):
        out = {}
        for m, latents in (given or {}).items():
            m = parse_modality(m)
            if m not in allowed:
                raise ValueError(f"{what} for {m.value}, which task {task.name!r} does not have ({list(allowed)})")
            if latents.shape[0] not in (1, batch_size):
                raise ValueError(f"{what} for {m.value} hold {latents.shape[0]} samples; give 1 or {batch_size}")
            out[m] = latents.to(device, dtype).expand(batch_size, *latents.shape[1:])
        return out

    given = per_sample_of(noise, (*task.targets, *task.conditions, *task.absent), "noise")

    def noise_of(m: Modality, shape: Sequence[int]) -> torch.Tensor:
        return given[m] if m in given else draw(shape)

    x = {m: noise_of(m, target_shapes[m]) for m in task.targets}
    null = {m: noise_of(m, conditions[m].shape[1:]) for m in task.conditions}
    null_t = dict.fromkeys(task.conditions, 1.0)
    given_null = per_sample_of(unconditional, task.conditions, "unconditional latents")
    null.update(given_null)
    null_t.update(dict.fromkeys(given_null, 0.0))
    absent_shapes = {parse_modality(m): s for m, s in (absent_shapes or {}).items()}
    absent = {m: noise_of(m, absent_shapes[m]) for m in task.absent if m in absent_shapes}
    absent.update(per_sample_of(absent_latents, task.absent, "absent latents"))
    null_vec = per_sample_of(null_pooled, task.conditions, "null pooled vectors")
    null_source = next((m for m in POOLED_PRIORITY if m in null_vec), None)
    schedules = {m: sigma_schedule(steps, shift=s).to(device) for m, s in _per_modality(shift, task.targets).items()}
    branches = guidance_branches(task.conditions, guidance)
    width = model.config.pooled_projection_dim

    def branch_inputs(branch: Branch, t_now: Mapping[Modality, torch.Tensor]):
        latents, times = dict(x), dict(t_now)
        for m in task.conditions:
            kept = m in branch.kept
            latents[m] = conditions[m].to(device, dtype) if kept else null[m]
            times[m] = torch.full((batch_size,), 0.0 if kept else null_t[m], device=device)
        for m, a in absent.items():
            latents[m], times[m] = a, torch.ones(batch_size, device=device)
        vec = torch.zeros(batch_size, width, device=device, dtype=dtype)
        source = next((m for m in POOLED_PRIORITY if m in branch.kept and m in pooled), None)
        if source is not None:
            vec[:, : pooled[source].shape[-1]] = pooled[source].to(device, dtype)
        elif not branch.kept and null_source is not None:
            vec[:, : null_vec[null_source].shape[-1]] = null_vec[null_source]
        return latents, times, vec

    for i in range(steps):
        t_now = {m: schedules[m][i].expand(batch_size) for m in task.targets}
        per_branch = [branch_inputs(b, t_now) for b in branches]
        latents = {m: torch.cat([p[0][m] for p in per_branch]) for m in per_branch[0][0]}
        times = {m: torch.cat([p[1][m] for p in per_branch]) for m in per_branch[0][1]}
        vec = torch.cat([p[2] for p in per_branch])
        pred = model(latents, times, vec)
        for m in task.targets:
            t_rep = times[m]
            out = pred[m] if PREDICTION[m] == "velocity" else velocity_from_x0(latents[m], pred[m], t_rep)
            v = dict(zip((b.name for b in branches), out.float().chunk(len(branches))))
            velocity = combine_branches(v, task.conditions, guidance)
            x[m] = euler_step(x[m].float(), velocity, schedules[m][i], schedules[m][i + 1]).to(dtype)
    return x
