"""Train the transformer on ShapesWorld latents held in memory and measure what it learnt.

No Ray and no Parquet: the toy codecs encode rendered scenes once (`encode_scenes`), then
`train` runs `omniflow.training.train_step` on batches drawn from them and scores the tasks it
trains with the demo's measure (`shapesworld.quality.evaluate`) as it goes. What the
learning benchmark (`benchmarks/shapesworld_learning.py`) and the learning test run; the jobs train
the same model the same way through Ray.

    >>> codecs = load_toy_codecs("runs/toy/codecs")
    >>> scenes = encode_scenes(codecs, 2000, seed=0)
    >>> result, model = train(LearningConfig(name="t2i", tasks="t2i", steps=600), codecs,
    ...                       toy_codec_configs("runs/toy/codecs"), scenes, eval_every=300, eval_samples=50)
    >>> result["curve"][-1]["tasks"]["t2i"]["both"]
"""

import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from omniflow.inference import AnyToAny
from omniflow.modality import Modality
from omniflow.objective import FlowObjective
from omniflow.presets import build_transformer, get_preset
from omniflow.tasks import get_task
from omniflow.training import (
    Batch,
    GroupedBatches,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    train_step,
)
from shapesworld.concepts import ConceptSplit, split_concepts
from shapesworld.quality import EVAL_TASKS, QualityConfig, evaluate
from shapesworld.toy.codecs import shapes_data

ALL_TASKS = "t2i,i2t,t2a,a2t,i2a,a2i,at2i,it2a,ai2t,joint"


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = 10
    guidance: float = 2.0
    shift: float = 3.0


class LearningConfig(BaseModel):
    """One controlled training run: what it trains on, the model, the objective, the optimiser, and how
    it is sampled for scoring."""

    model_config = ConfigDict(extra="forbid")
    name: str
    tasks: str = Field(ALL_TASKS, description="comma-separated task[:weight]")
    preset: str = "toy"
    model: dict = Field(default_factory=dict, description="overrides of the preset's transformer config")
    objective: FlowObjective = Field(default_factory=FlowObjective)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.0))
    batch_size: int = 64
    grouped: bool = Field(False, description="train each step on one modality group (`GroupedBatches`); "
                                           "needs objective.rules.skip_absent")
    steps: int = 600
    seed: int = 0
    precision: str = "fp32"
    train_scenes: int | None = Field(None, description="distinct training scenes (default: --train-scenes)")
    sampling: Sampling = Field(default_factory=Sampling)
    pooled: tuple[Literal["image", "text", "audio"], ...] = Field(
        (), description="condition on these modalities' pooled vectors (the toy CLIP's and its audio tower's, "
                        "as OmniFlow on CLIP's and LanguageBind's)")
    held_out_concepts: int = Field(0, ge=0, le=6, description="colour-shape pairs never trained on "
                                   "(`split_concepts(n_held_out=...)`), scored apart as `held_out_tasks`")

    @model_validator(mode="after")
    def _grouped_skips(self) -> "LearningConfig":
        if self.grouped and not self.objective.rules.skip_absent:
            raise ValueError("grouped=true needs objective.rules.skip_absent=true (a group leaves out what it lacks)")
        return self

    @property
    def absent(self) -> str:
        """How sampling treats absent modalities: as the objective trained them."""
        return "skip" if self.objective.rules.skip_absent else "noise"

    def concept_split(self) -> ConceptSplit | None:
        return split_concepts(n_held_out=self.held_out_concepts, seed=self.seed) if self.held_out_concepts else None

    def task_weights(self) -> dict[str, float]:
        weights = {}
        for item in self.tasks.split(","):
            name, _, weight = item.partition(":")
            weights[get_task(name).name] = float(weight or 1.0)
        return weights


def encode_scenes(codecs: dict, n: int, seed: int, batch: int = 256, pooled: Mapping[Modality, Any] | None = None
                  ) -> dict:
    """`n` ShapesWorld triplets as latents (the codecs' encode, as the encode job runs it) + concepts,
    and with `pooled` encoders (modality -> encoder) each modality's pooled vectors."""
    image, text, audio = codecs[Modality.IMAGE], codecs[Modality.TEXT], codecs[Modality.AUDIO]
    data = shapes_data(n, seed=seed, image_size=image.config.resolution, mel=audio.mel)
    media = {Modality.IMAGE: list(data.images), Modality.TEXT: data.captions,
             Modality.AUDIO: [(w, audio.sample_rate) for w in data.waves]}
    out = {m: [] for m in ("image", "text", "audio")}
    vectors = {m.value: [] for m in pooled or {}}
    with torch.inference_mode():
        for i in range(0, n, batch):
            pixels = torch.from_numpy(data.images[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            out["image"].append(image.encode(pixels))
            out["text"].append(text.encode(data.captions[i:i + batch]))
            waves = [(w, audio.sample_rate) for w in data.waves[i:i + batch]]
            out["audio"].append(audio.encode(audio.preprocess(waves)))
            for m, encoder in (pooled or {}).items():
                vectors[m.value].append(encoder.embed(media[m][i:i + batch]))
    latents = {m: torch.cat(v).float() for m, v in out.items()}
    return {"latents": latents, "concepts": data.concepts, "captions": data.captions,
            "pooled": {m: torch.cat(v).float() for m, v in vectors.items()}}


def training_rows(config: LearningConfig, scenes: dict) -> np.ndarray:
    """Indices of the scenes `config` trains on: the first `train_scenes`, less held-out concepts."""
    n_rows = min(config.train_scenes or len(scenes["concepts"]), len(scenes["concepts"]))
    split = config.concept_split()
    return np.array([i for i, c in enumerate(scenes["concepts"][:n_rows]) if split is None or c in split.train])


def sample_batch(config: LearningConfig, scenes: dict, rng: np.random.Generator, rows: np.ndarray) -> Batch:
    weights = config.task_weights()
    names = list(weights)
    p = np.array([weights[n] for n in names]) / sum(weights.values())
    idx = torch.from_numpy(rows[rng.integers(len(rows), size=config.batch_size)])
    tasks = [get_task(names[i]) for i in rng.choice(len(names), size=config.batch_size, p=p)]
    pooled = {m: v[idx] for m, v in scenes.get("pooled", {}).items() if m in config.pooled}
    return Batch(latents={m: x[idx] for m, x in scenes["latents"].items()}, tasks=tasks, pooled=pooled)


def score(config: LearningConfig, model: torch.nn.Module, codecs: dict, codec_configs: dict, samples: int,
          sampling: Sampling, concepts: tuple | None = None, pooled: Mapping[Modality, Any] | None = None
          ) -> dict[str, dict[str, float]]:
    """Quality of `model` on the evaluated tasks it was trained on: task -> both / colour / shape /
    unknown (unreadable) on `samples` held-out scenes (of `concepts` only, when given), sampled as `sampling`
    says and as it was trained."""
    info = {"codecs": codec_configs, "conventions": {"absent": config.absent},
            "latent_shapes": {m.value: list(s) for m, s in get_preset(config.preset).latent_shapes().items()}}
    quality = QualityConfig(tasks=tuple(t for t in EVAL_TASKS if t in config.task_weights()), samples=samples,
                            steps=sampling.steps, guidance=sampling.guidance, shift=sampling.shift,
                            concepts=tuple(str(c) for c in concepts) if concepts else None)
    model.eval()
    encoders = {m: e for m, e in (pooled or {}).items() if m.value in config.pooled}
    missing = sorted(set(config.pooled) - {m.value for m in encoders})
    if missing:
        raise ValueError(f"{config.name}: no pooled encoder for {missing}")
    report = evaluate(AnyToAny(model, codecs, encoders, info), quality, log=lambda _: None)
    return {t: {k: r[k] for k in ("both", "colour", "shape", "unknown") if k in r} for t, r in report["tasks"].items()}


def train(config: LearningConfig, codecs: dict, codec_configs: dict, scenes: dict, *, eval_every: int,
          eval_samples: int, log: Callable[[str], None] = print,
          on_point: Callable[[dict], None] | None = None, pooled: Mapping[Modality, Any] | None = None
          ) -> tuple[dict, torch.nn.Module]:
    """Train a fresh transformer on `scenes` (from `encode_scenes`) and score it every `eval_every`
    steps on `eval_samples` held-out scenes per trained task. Returns the curve and the model;
    `on_point` gets the result so far after every evaluation (a long run keeps what it measured);
    `pooled` (modality -> pooled encoder) embeds conditions at evaluation for `config.pooled`, as
    `encode_scenes` embedded the training scenes."""
    unembedded = sorted(set(config.pooled) - set(scenes.get("pooled", {})))
    if unembedded:
        raise ValueError(f"{config.name}: the scenes hold no pooled vectors for {unembedded} (encode_scenes(pooled=...))")
    torch.manual_seed(config.seed)
    model = build_transformer(config.preset, seed=config.seed, **config.model)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    rows, split = training_rows(config, scenes), config.concept_split()
    curve, losses, train_seconds = [], [], 0.0
    log(f"[{config.name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(rows)} scenes, tasks {config.task_weights()}"
        + (f", never trained on {', '.join(map(str, split.held_out))}" if split else ""))
    groups = GroupedBatches(config.batch_size) if config.grouped else None
    for step in range(1, config.steps + 1):
        model.train()
        start = time.perf_counter()
        if groups is None:
            batch = sample_batch(config, scenes, rng, rows)
        else:
            while (batch := groups.pop()) is None:
                groups.push(sample_batch(config, scenes, rng, rows))
        out = train_step(model, [batch], optimizer=optimizer, scheduler=scheduler,
                         objective=config.objective, grad_clip=config.optim.grad_clip, precision=config.precision,
                         generator=generator)
        train_seconds += time.perf_counter() - start
        losses.append(out.loss)
        if step % eval_every == 0 or step == config.steps:
            start = time.perf_counter()
            tasks = score(config, model, codecs, codec_configs, eval_samples, config.sampling,
                          concepts=split.train if split else None, pooled=pooled)
            point = {"step": step, "train_seconds": round(train_seconds, 1),
                     "loss": round(float(np.mean(losses[-eval_every:])), 4), "tasks": tasks}
            if split:
                point["held_out_tasks"] = score(config, model, codecs, codec_configs, eval_samples, config.sampling,
                                                concepts=split.held_out, pooled=pooled)
            point["eval_seconds"] = round(time.perf_counter() - start, 1)
            curve.append(point)
            for key, label in (("tasks", ""), ("held_out_tasks", " held-out concepts")):
                if key in point:
                    both = " ".join(f"{t} {r['both']:.2f}/{r['colour']:.2f}/{r['shape']:.2f}"
                                    for t, r in point[key].items())
                    log(f"[{config.name}] step {step} ({point['train_seconds']} s) loss {point['loss']:.3f} | "
                        f"both/colour/shape{label} {both}")
            if on_point is not None:
                on_point(_result(config, curve, train_seconds, step))
    return _result(config, curve, train_seconds, config.steps), model


def _result(config: LearningConfig, curve: list[dict], train_seconds: float, steps: int) -> dict:
    return {"config": config.model_dump(mode="json"), "curve": list(curve),
            "seconds_per_step": round(train_seconds / steps, 4)}


def sampling_sweep(config: LearningConfig, model: torch.nn.Module, codecs: dict, codec_configs: dict, samples: int,
                   grid: list[dict], log: Callable[[str], None] = print,
                   pooled: Mapping[Modality, Any] | None = None) -> list[dict]:
    """The trained config's quality under other sampler settings (steps, guidance, shift)."""
    rows = []
    for setting in grid:
        sampling = Sampling(**{**config.sampling.model_dump(), **setting})
        rows.append({"sampling": sampling.model_dump(),
                     "tasks": score(config, model, codecs, codec_configs, samples, sampling,
                                    concepts=split.train if (split := config.concept_split()) else None,
                                    pooled=pooled)})
        both = " ".join(f"{t} {r['both']:.2f}" for t, r in rows[-1]["tasks"].items())
        log(f"[{config.name}] sampling {rows[-1]['sampling']}: both {both}")
    return rows


