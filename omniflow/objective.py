"""Multi-modal rectified-flow training objective.

`plan_batch` turns one task per sample into per-modality flow times, loss masks and a pooled-vector
mask, applying the reference's training rules; `flow_loss` noises the latents, runs the model and
returns the weighted, masked MSE with each modality's and task's component for logging.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

from omniflow.config import deep_merge
from omniflow.flow import (
    TimestepScheme,
    interpolate,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)
from omniflow.modality import MODALITIES, Modality
from omniflow.tasks import Role, Task, get_task
from omniflow.transformer import PREDICTION, OmniFlowTransformer
from omniflow.wrappers import unwrap

SD3_SHIFT = 3.0


class TimestepSampling(BaseModel):
    """How a target's flow time is drawn: a density, then SD3's shift per modality."""

    model_config = ConfigDict(extra="forbid")
    scheme: TimestepScheme = "logit_normal"
    mean: float = 0.0
    std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: dict[Modality, PositiveFloat] = Field(
        default_factory=lambda: dict.fromkeys(MODALITIES, SD3_SHIFT),
        description=f"per modality; a modality not named keeps SD3's {SD3_SHIFT:g}",
    )

    @field_validator("shift")
    @classmethod
    def _every_modality(cls, shift: dict[Modality, float]) -> dict[Modality, float]:
        return {m: shift.get(m, SD3_SHIFT) for m in MODALITIES}


class TrainingRules(BaseModel):
    """The reference's per-sample rules for conditions, applied independently per sample.

    noised_condition_p: a condition is noised to a sampled time instead of kept clean (loss off).
    condition_drop_p: a condition is replaced by pure noise at t = 1, for classifier-free guidance.
    pooled_drop_p: the pooled vector is zeroed.
    pooled_from_target: task -> the share of its samples that take the pooled vector of their
        target instead of their condition's (the release's training script: t2a and i2a 0.3, from
        the target audio; its rule for t2i and a2i compares a task name with a list and never
        applies).
    pooled_from_any: tasks whose samples take the pooled vector of one of their modalities drawn
        uniformly (the release's training script does so for its any-to-any task, `joint` here).
    clip_prefix: task -> the share of its samples whose text condition is the CLIP text encoders'
        hidden states followed by the text latent (`text_condition: clip_prefix` at sampling), kept
        clean unless dropped (the release: t2i and t2a 0.5). `omniflow.training.train_step` runs
        them as a forward of their own (`split_clip_prefix`); it needs the captions and a
        `clip-text-pooled` text encoder.
    skip_absent: leave a sample's absent modalities out of the forward pass instead of feeding
        them as pure noise at t = 1 (the reference feeds noise). `train_step` then runs one forward
        per group of samples with the same modalities; `flow_loss` on its own skips a modality
        absent from every sample of its batch. A model trained so is sampled so too
        (`"conventions": {"absent": "skip"}` in its `omniflow.json`).
    """

    model_config = ConfigDict(extra="forbid")
    noised_condition_p: float = Field(0.2, ge=0, le=1)
    condition_drop_p: float = Field(0.15, ge=0, le=1)
    pooled_drop_p: float = Field(0.15, ge=0, le=1)
    pooled_from_target: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    pooled_from_any: list[str] = Field(default_factory=list)
    clip_prefix: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    skip_absent: bool = False

    @field_validator("pooled_from_target")
    @classmethod
    def _one_target(cls, shares: dict[str, float]) -> dict[str, float]:
        for name in shares:
            if len(get_task(name).targets) != 1:
                raise ValueError(f"pooled_from_target: task {name!r} has {len(get_task(name).targets)} targets; "
                                 f"it takes tasks with one")
        return shares

    @property
    def prefixes_clip(self) -> bool:
        """Whether some task draws CLIP hidden states before its text latent."""
        return any(share > 0 for share in self.clip_prefix.values())

    @field_validator("clip_prefix")
    @classmethod
    def _text_conditions(cls, shares: dict[str, float]) -> dict[str, float]:
        for name in shares:
            if get_task(name).roles[Modality.TEXT] != Role.CONDITION:
                raise ValueError(f"clip_prefix: task {name!r} has no text condition; it takes tasks conditioned on text")
        return shares

    @field_validator("pooled_from_any")
    @classmethod
    def _known_tasks(cls, names: list[str]) -> list[str]:
        for name in names:
            get_task(name)  # an unknown task name is an error that lists the known ones
        return names


# The released OmniFlow's training recipe (its scripts/train.py), as this objective's settings: SD3's
# schedule at shift 1, the target's pooled vector for 30% of t2a / i2a, any modality's for the
# any-to-any task, CLIP hidden states before half of the t2i / t2a text latents, and the text loss's
# direction and decoder terms. Its condition noising and dropout rates are this objective's defaults.
REFERENCE_OBJECTIVE: dict[str, Any] = {
    "timesteps": {"shift": {"image": 1.0, "text": 1.0, "audio": 1.0}},
    "rules": {"pooled_from_target": {"t2a": 0.3, "i2a": 0.3}, "pooled_from_any": ["joint"],
              "clip_prefix": {"t2i": 0.5, "t2a": 0.5}},
    "text_direction_weight": 0.1,
    "text_anchor_weight": 0.1,
}


class FlowObjective(BaseModel):
    """The training objective. `profile: reference` starts from the released OmniFlow's recipe
    (`REFERENCE_OBJECTIVE`); fields given beside it override the profile's."""

    model_config = ConfigDict(extra="forbid")
    profile: Literal["project", "reference"] = "project"
    timesteps: TimestepSampling = Field(default_factory=TimestepSampling)
    rules: TrainingRules = Field(default_factory=TrainingRules)
    loss_weights: dict[Modality, float] = Field(default_factory=lambda: {m: 1.0 for m in MODALITIES})
    text_direction_weight: float = Field(
        0.0, ge=0, description="add this times the MSE between the per-token L2-normalised text x0 prediction and "
        "target to the text loss (the released OmniFlow trains with 0.1)")
    text_anchor_weight: float = Field(
        0.0, ge=0, description="add this times the frozen text decoder's cross-entropy of the caption, read from the "
        "text x0 prediction, to the text loss (the released OmniFlow trains with 0.1); needs the captions")

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") == "reference":
            return deep_merge(REFERENCE_OBJECTIVE, data)
        return data


# Text x0 predictions (B, Q, D) and their captions -> per-sample cross-entropy (B,), differentiable
# in the predictions: the frozen text decoder (`omniflow.codecs.text_vae.TextVAE.caption_nll`).
TextAnchor = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


@dataclass
class BatchPlan:
    """Per-sample flow times (B,) and loss masks (B,) per modality, and which pooled vector to use."""

    timesteps: dict[Modality, torch.Tensor]
    loss_mask: dict[Modality, torch.Tensor]
    pooled_source: list[Modality | None]
    pooled_keep: torch.Tensor


@dataclass
class LossOutput:
    loss: torch.Tensor
    per_modality: dict[str, torch.Tensor]
    per_task: dict[str, torch.Tensor]


def plan_batch(
    tasks: Sequence[Task],
    objective: FlowObjective,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    fixed_time: float | None = None,
) -> BatchPlan:
    """Draw flow times and masks for a batch with one task per sample.

    With `fixed_time` every target sits at that time and conditions are clean, kept and pooled:
    no randomness but the noise, which is what a comparable validation loss needs.
    """
    batch = len(tasks)
    rules, sampling = objective.rules, objective.timesteps
    if fixed_time is not None:
        rules = TrainingRules(noised_condition_p=0, condition_drop_p=0, pooled_drop_p=0, skip_absent=rules.skip_absent)
    uniform = lambda: torch.rand(batch, generator=generator, device=device)
    dropped: dict[Modality, torch.Tensor] = {}
    timesteps, loss_mask = {}, {}
    for m in MODALITIES:
        role = [task.roles[m] for task in tasks]
        is_target = torch.tensor([r == Role.TARGET for r in role], device=device)
        is_condition = torch.tensor([r == Role.CONDITION for r in role], device=device)
        drawn = sample_timesteps(
            batch,
            scheme=sampling.scheme,
            mean=sampling.mean,
            std=sampling.std,
            mode_scale=sampling.mode_scale,
            generator=generator,
            device=device,
        )
        drawn = shift_timesteps(drawn, sampling.shift[m])
        if fixed_time is not None:
            drawn = torch.full_like(drawn, fixed_time)
        noised = is_condition & (uniform() < rules.noised_condition_p)
        dropped[m] = is_condition & (uniform() < rules.condition_drop_p)
        t = torch.ones(batch, device=device)
        t = torch.where(is_condition, torch.zeros_like(t), t)
        t = torch.where(is_target | noised, drawn, t)
        timesteps[m] = torch.where(dropped[m], torch.ones_like(t), t)
        loss_mask[m] = is_target.float()

    sources = [task.pooled_source for task in tasks]
    keep = uniform() >= rules.pooled_drop_p
    if rules.pooled_from_target:
        u = uniform()
        sources = [task.targets[0] if u[b] < rules.pooled_from_target.get(task.name, 0.0) else source
                   for b, (task, source) in enumerate(zip(tasks, sources))]
    if rules.pooled_from_any:
        u = uniform()
        for b, task in enumerate(tasks):
            if task.name in rules.pooled_from_any:
                present = [m for m in MODALITIES if m in task.targets or m in task.conditions]
                sources[b] = present[min(int(u[b] * len(present)), len(present) - 1)]
    for b, source in enumerate(sources):
        if source is None or dropped[source][b]:
            keep[b] = False
    return BatchPlan(timesteps=timesteps, loss_mask=loss_mask, pooled_source=sources, pooled_keep=keep)


def select_pooled(
    pooled: Mapping[str, torch.Tensor], sources: Sequence[Modality | None], keep: torch.Tensor, width: int
) -> torch.Tensor:
    """Per sample, the pooled vector of its source modality, or zeros where none or not kept."""
    ref = next(iter(pooled.values()), None)
    out = torch.zeros(len(sources), width, device=keep.device, dtype=ref.dtype if ref is not None else None)
    for b, source in enumerate(sources):
        if source is not None and keep[b] and source in pooled:
            vec = pooled[source][b]
            out[b, : vec.shape[-1]] = vec
    return out


def direction_mse(pred_BLD: torch.Tensor, target_BLD: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Per-sample MSE (B,) between per-token unit vectors of a prediction and its target."""
    unit = lambda x: torch.nn.functional.normalize(x.float(), dim=-1, eps=eps)
    return (unit(pred_BLD) - unit(target_BLD)).pow(2).flatten(1).mean(1)


def anchor_nll(pred_BQD: torch.Tensor, scored: torch.Tensor, captions: Sequence[str | None] | None,
               text_anchor: TextAnchor | None) -> torch.Tensor:
    """The text anchor's cross-entropy (B,) for the `scored` samples, zero for the others."""
    rows = scored.nonzero().flatten().tolist()
    if text_anchor is None:
        raise ValueError("objective.text_anchor_weight needs the text decoder (text_anchor)")
    if captions is None or any(captions[b] is None for b in rows):
        raise ValueError("objective.text_anchor_weight needs the caption of every sample with a text target")
    out = torch.zeros(scored.shape[0], device=pred_BQD.device)
    out[rows] = text_anchor(pred_BQD[rows], [captions[b] for b in rows]).float()
    return out


def flow_loss(
    model: OmniFlowTransformer,
    x0: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    *,
    objective: FlowObjective | None = None,
    pooled: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    fixed_time: float | None = None,
    captions: Sequence[str | None] | None = None,
    text_anchor: TextAnchor | None = None,
    text_prefix: int = 0,
) -> LossOutput:
    """Weighted, masked flow-matching loss for a batch with one task per sample.

    Args:
        x0: modality -> clean latents (B, ...). Text latents are `text_out_dim` wide. A modality
            absent from every sample may be left out (it is then skipped).
        tasks: one `Task` per sample.
        pooled: modality -> that modality's pooled vector (B, <= pooled_projection_dim).
        fixed_time: put every target at this flow time, with no condition noising or dropout
            (for validation at fixed, evenly spaced times).
        captions, text_anchor: each sample's caption and the frozen text decoder's cross-entropy,
            for `objective.text_anchor_weight` (only samples with a text target are scored).
        text_prefix: the text stream holds this many CLIP hidden states before the text latent
            (`rules.clip_prefix`): every sample's text is a condition, clean unless dropped, and
            the latent tokens' features past the latent width stay zero when noised.

    The loss is mean over the batch of sum over target modalities of weight * per-sample MSE;
    image and audio heads regress the velocity noise - x0, the text head regresses x0.
    """
    objective = objective or FlowObjective()
    ref = next(iter(x0.values()))
    batch, device = ref.shape[0], ref.device
    if len(tasks) != batch:
        raise ValueError(f"got {len(tasks)} tasks for a batch of {batch}")
    plan = plan_batch(tasks, objective, generator=generator, device=device, fixed_time=fixed_time)

    bare = unwrap(model)  # attributes live on the model; the call goes through DDP / FSDP wrappers
    used = [m for m in bare.streams if m in x0]
    if objective.rules.skip_absent:
        used = [m for m in used if plan.loss_mask[m].any() or (plan.timesteps[m] < 1).any()]
    missing = [m for m in bare.streams if m not in x0 and plan.loss_mask[m].any()]
    if missing:
        raise ValueError(f"tasks target {missing} but the batch has no latents for them")

    if text_prefix:
        if any(task.roles[Modality.TEXT] != Role.CONDITION for task in tasks):
            raise ValueError("a text stream with CLIP hidden states before the latent must be a condition of every sample")
        plan.timesteps[Modality.TEXT] = (plan.timesteps[Modality.TEXT] >= 1).to(plan.timesteps[Modality.TEXT].dtype)
    noise = {m: torch.randn(x0[m].shape, generator=generator, device=device, dtype=x0[m].dtype) for m in used}
    x_t = {m: interpolate(x0[m], noise[m], plan.timesteps[m]) for m in used}
    if text_prefix and Modality.TEXT in x_t:  # (skip_absent leaves out a stream dropped in every sample)
        x_t[Modality.TEXT][:, text_prefix:, bare.config.text_out_dim:] = 0
    pooled_vec = select_pooled(pooled or {}, plan.pooled_source, plan.pooled_keep, bare.config.pooled_projection_dim)
    pred = model(x_t, {m: plan.timesteps[m] for m in used}, pooled_vec.to(ref.dtype))

    per_sample = torch.zeros(batch, device=device)
    per_modality = {}
    for m in used:
        target = x0[m] if PREDICTION[m] == "x0" else velocity_target(x0[m], noise[m])
        if m == Modality.TEXT and text_prefix:  # a condition (loss masked): the head's width of its stream
            target = target[..., : bare.config.text_out_dim]
        if pred[m].shape != target.shape:
            raise ValueError(f"{m} prediction {tuple(pred[m].shape)} does not match target {tuple(target.shape)}")
        mse = (pred[m].float() - target.float()).pow(2).flatten(1).mean(1)
        mask = plan.loss_mask[m]
        if m == Modality.TEXT and objective.text_direction_weight:
            mse = mse + objective.text_direction_weight * direction_mse(pred[m], target)
        if m == Modality.TEXT and objective.text_anchor_weight and mask.any():
            ce = anchor_nll(pred[m], mask.bool(), captions, text_anchor)
            mse = mse + objective.text_anchor_weight * ce
            per_modality["text_ce"] = (ce.sum() / mask.sum()).detach()
        per_sample = per_sample + objective.loss_weights.get(m, 1.0) * mask * mse
        if mask.any():
            per_modality[m.value] = ((mask * mse).sum() / mask.sum()).detach()

    per_task = {}
    for name in dict.fromkeys(t.name for t in tasks):
        idx = torch.tensor([t.name == name for t in tasks], device=device)
        per_task[name] = per_sample[idx].mean().detach()
    return LossOutput(loss=per_sample.mean(), per_modality=per_modality, per_task=per_task)
