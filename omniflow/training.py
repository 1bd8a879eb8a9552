"""One optimizer step of the multi-modal flow objective, and what it needs: AdamW with decay only
on matrices, warm-up then cosine, gradient accumulation and clipping, autocast.

No Ray here: `jobs/train.py` runs this inside Ray Train workers, and a bare loop can run it as is.

    >>> optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    >>> scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-4), total_steps=10_000)
    >>> out = train_step(model, [batch], optimizer=optimizer, scheduler=scheduler, objective=FlowObjective())
"""

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from omniflow.conventions import clip_prefixed
from omniflow.lr import warmup_cosine
from omniflow.objective import FlowObjective, TextAnchor, flow_loss
from omniflow.tasks import Task
from omniflow.wrappers import unwrap

Precision = Literal["fp32", "bf16"]


class OptimConfig(BaseModel):
    """AdamW and its schedule: linear warm-up to `lr`, cosine decay to `lr * min_lr_ratio`."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


@dataclass
class Batch:
    """One micro-batch: clean latents and pooled vectors per modality, a task per sample, and the
    captions when read (for the text decoder's anchor)."""

    latents: dict[str, torch.Tensor]
    tasks: list[Task]
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    captions: list[str | None] | None = None
    text_prefix: int = 0  # CLIP hidden states before the text latent (`split_clip_prefix`)

    def __len__(self) -> int:
        return len(self.tasks)

    def by_streams(self) -> list["Batch"]:
        """The batch split into groups of samples whose tasks use the same modalities, each holding
        only those modalities' latents (t2i and i2t share one group, at2i and joint another)."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, task in enumerate(self.tasks):
            groups.setdefault(tuple(m.value for m in task.roles if m not in task.absent), []).append(i)
        if len(groups) == 1 and set(next(iter(groups))) >= set(self.latents):
            return [self]
        return [self.select(rows, modalities=used) for used, rows in groups.items()]

    def select(self, rows: list[int] | slice, modalities: tuple[str, ...] | None = None) -> "Batch":
        """These samples (and only these modalities' latents, when given)."""
        index = rows if isinstance(rows, slice) else list(rows)
        pick = lambda items: items[index] if isinstance(index, slice) else [items[i] for i in index]
        return Batch(latents={m: x[index] for m, x in self.latents.items() if modalities is None or m in modalities},
                     tasks=pick(self.tasks), pooled={m: v[index] for m, v in self.pooled.items()},
                     captions=None if self.captions is None else pick(self.captions), text_prefix=self.text_prefix)

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "Batch":
        move = lambda d: {k: v.to(device, dtype, non_blocking=True) for k, v in d.items()}
        return Batch(latents=move(self.latents), tasks=self.tasks, pooled=move(self.pooled), captions=self.captions,
                     text_prefix=self.text_prefix)


class GroupedBatches:
    """Mixed batches re-cut into batches of one modality group each (`Batch.by_streams`).

    With `skip_absent` a mixed batch runs as one small forward per group; on CPU, small forwards
    cost nearly as much as full ones. `push` mixed batches in and `pop` batches of `batch_size`
    samples that all use the same modalities: every sample pushed is trained on, in the mix's
    proportions, and each step is one full-size forward. At most one batch per group waits.

        >>> groups = GroupedBatches(64)
        >>> while (batch := groups.pop()) is None:
        ...     groups.push(next_mixed_batch())
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: dict[tuple[str, ...], list[Batch]] = {}

    def push(self, batch: Batch) -> None:
        for group in batch.by_streams():
            self.pending.setdefault(tuple(sorted(group.latents)), []).append(group)

    def waiting(self) -> int:
        return sum(len(b) for parts in self.pending.values() for b in parts)

    def pop(self) -> Batch | None:
        """A batch of `batch_size` samples of the fullest group, or None while no group has enough."""
        sizes = {key: sum(len(b) for b in parts) for key, parts in self.pending.items()}
        key = max(sizes, key=sizes.get, default=None)
        if key is None or sizes[key] < self.batch_size:
            return None
        parts = self.pending.pop(key)
        whole = Batch(latents={m: torch.cat([b.latents[m] for b in parts]) for m in parts[0].latents},
                      tasks=[t for b in parts for t in b.tasks],
                      pooled={m: torch.cat([b.pooled[m] for b in parts]) for m in parts[0].pooled},
                      captions=None if any(b.captions is None for b in parts) else [c for b in parts for c in b.captions])
        if len(whole) > self.batch_size:
            self.pending[key] = [whole.select(slice(self.batch_size, None))]
        return whole.select(slice(0, self.batch_size))


# Captions -> the CLIP text encoders' penultimate hidden states side by side (B, L, C).
ClipStates = Callable[[Sequence[str]], torch.Tensor]


def split_clip_prefix(batch: Batch, shares: Mapping[str, float], clip_states: ClipStates | None, *, width: int,
                      generator: torch.Generator | None = None) -> list[Batch]:
    """`rules.clip_prefix`: the batch as its plain samples and, as a batch of their own, those drawn
    (each task's share) to take their captions' CLIP hidden states before the text latent, that
    text stream zero-padded to `width` (`omniflow.conventions.clip_prefixed`). Streams of two
    lengths need two forwards: the transformer's text stream has no padding mask."""
    device = next(iter(batch.latents.values())).device
    u = torch.rand(len(batch), generator=generator, device=device).tolist()
    drawn = [i for i, task in enumerate(batch.tasks) if u[i] < shares.get(task.name, 0.0)]
    if not drawn:
        return [batch]
    if clip_states is None:
        raise ValueError("objective.rules.clip_prefix needs the CLIP text encoders (clip_states)")
    if batch.captions is None or any(batch.captions[i] is None for i in drawn):
        raise ValueError("objective.rules.clip_prefix needs the caption of every sample it draws")
    prefixed = batch.select(drawn)
    hidden = clip_states(prefixed.captions).to(device)
    prefixed.latents["text"] = clipped = clip_prefixed(hidden, prefixed.latents["text"], width)
    prefixed.text_prefix = clipped.shape[1] - batch.latents["text"].shape[1]
    rest = sorted(set(range(len(batch))) - set(drawn))
    return [batch.select(rest), prefixed] if rest else [prefixed]


@dataclass
class StepOutput:
    loss: float
    per_modality: dict[str, float]
    per_task: dict[str, float]
    task_counts: dict[str, int]
    grad_norm: float  # before clipping
    lr: float
    samples: int


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW; biases, norms and embeddings tables (parameters under 2-D) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, *,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`omniflow.lr.warmup_cosine` as a `LambdaLR`: linear warm-up over `warmup_steps`, then cosine
    decay to `min_lr_ratio` of the peak at `total_steps`; its `state_dict` goes into training
    checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, total=total_steps, warmup=config.warmup_steps, floor=config.min_lr_ratio),
    )


def autocast(device: torch.device, precision: Precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _no_sync(model: nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if not last and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    objective: FlowObjective,
    grad_clip: float | None = None,
    precision: Precision = "fp32",
    generator: torch.Generator | None = None,
    text_anchor: TextAnchor | None = None,
    clip_states: ClipStates | None = None,
) -> StepOutput:
    """Accumulate gradients over `micro_batches` (weighted by their sizes), clip, step.

    Per-modality and per-task losses come back averaged over the step's samples, for logging.
    With `objective.rules.skip_absent` each micro-batch runs as one forward per group of samples
    that use the same modalities (`Batch.by_streams`), so no sample pays for a stream it lacks;
    with `objective.rules.clip_prefix` the samples drawn to take CLIP hidden states run as one
    more (`split_clip_prefix`, reading `clip_states`).
    """
    if objective.rules.skip_absent:
        micro_batches = [group for batch in micro_batches for group in batch.by_streams()]
    if objective.rules.prefixes_clip:
        width = unwrap(model).config.joint_attention_dim
        micro_batches = [part for batch in micro_batches for part in split_clip_prefix(
            batch, objective.rules.clip_prefix, clip_states, width=width, generator=generator)]
    total = sum(len(b) for b in micro_batches)
    device = next(iter(micro_batches[0].latents.values())).device
    loss_sum, modality_sum, modality_n, task_sum, task_n = 0.0, {}, {}, {}, {}
    for i, batch in enumerate(micro_batches):
        with _no_sync(model, last=i == len(micro_batches) - 1), autocast(device, precision):
            out = flow_loss(model, batch.latents, batch.tasks, objective=objective, pooled=batch.pooled,
                            generator=generator, captions=batch.captions, text_anchor=text_anchor,
                            text_prefix=batch.text_prefix)
        (out.loss * (len(batch) / total)).backward()
        loss_sum += out.loss.item() * len(batch)
        for name, value in out.per_modality.items():
            modality_sum[name] = modality_sum.get(name, 0.0) + value.item() * len(batch)
            modality_n[name] = modality_n.get(name, 0) + len(batch)
        for name, value in out.per_task.items():
            n = sum(t.name == name for t in batch.tasks)
            task_sum[name] = task_sum.get(name, 0.0) + value.item() * n
            task_n[name] = task_n.get(name, 0) + n
    # The total gradient norm before clipping (an infinite limit measures without clipping).
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip is not None else float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepOutput(
        loss=loss_sum / total,
        per_modality={k: modality_sum[k] / modality_n[k] for k in modality_sum},
        per_task={k: task_sum[k] / task_n[k] for k in task_sum},
        task_counts=task_n,
        grad_norm=grad_norm,
        lr=lr,
        samples=total,
    )


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    objective: FlowObjective,
    times: Sequence[float],
    seed: int = 0,
    precision: Precision = "fp32",
    text_anchor: TextAnchor | None = None,
) -> dict[str, float]:
    """Loss at each fixed flow time over fixed batches with fixed noise: comparable across steps
    and runs. Returns the mean over times ("loss") and each time's value ("loss_t0.5")."""
    if objective.rules.skip_absent:
        batches = [group for batch in batches for group in batch.by_streams()]
    out: dict[str, float] = {}
    for t in times:
        generator = torch.Generator(device=next(iter(batches[0].latents.values())).device).manual_seed(seed)
        total, n = 0.0, 0
        for batch in batches:
            with autocast(next(iter(batch.latents.values())).device, precision):
                loss = flow_loss(model, batch.latents, batch.tasks, objective=objective, pooled=batch.pooled,
                                 generator=generator, fixed_time=t, captions=batch.captions, text_anchor=text_anchor)
            total += loss.loss.item() * len(batch)
            n += len(batch)
        out[f"loss_t{t:g}"] = total / n
    out["loss"] = sum(out[f"loss_t{t:g}"] for t in times) / len(times)
    return out
