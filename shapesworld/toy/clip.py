"""Build, cache and load the toy CLIP and aesthetic head that score ShapesWorld.

The toy CLIP is open_clip's `CLIP` at a tiny size (a ViT on 32x32 images, a two-layer text
transformer over open_clip's own BPE vocabulary), trained here contrastively with open_clip's
`ClipLoss` on ShapesWorld image-caption pairs. Its aesthetic head is LAION's v2 architecture fit
on its image embeddings: clean renders score `clean_score`, blank and pure-noise images (the
curation defects) `defect_score`. Both are saved like released weights (an open_clip model config
JSON + safetensors checkpoint; the head in LAION's key layout) and load through
`omniflow.scoring`, the same code that loads ViT-L/14 and the LAION heads.

`build_toy_clip` measures on held-out scenes how well matched pairs outscore mismatched ones (a
caption naming another concept, same wording) and how well the head separates clean from defective
images, and writes `clip.json`; a rerun with the same config reuses the directory.

    python -m shapesworld.toy build-clip --out runs/toy/clip
"""

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from omniflow.codecs.base import CODEC_SET
from omniflow.codecs.media import decode_image
from omniflow.config import config_hash
from omniflow.lr import warmup_cosine
from omniflow.modality import Modality
from omniflow.scoring.aesthetic import (
    AestheticConfig,
    AestheticHead,
    load_aesthetic_head,
    new_aesthetic_head,
    save_aesthetic_head,
    train_aesthetic_head,
)
from omniflow.scoring.clip import ClipConfig, OpenClip, load_clip
from shapesworld import (
    all_concepts,
    make_records,
    render_captions,
    render_images,
    sample_concepts,
    sample_scenes,
)
from shapesworld.toy.audio_tower import ToyAudioTowerBuild, build_audio_tower
from shapesworld.toy.cache import cached_manifest, commit, new_staging

MANIFEST = "clip.json"
MODEL_NAME = "shapesworld-clip"  # the stem of the model config file, as open_clip registers it
CHECKPOINT = "open_clip_model.safetensors"
AESTHETIC_WEIGHTS = "aesthetic_v2.safetensors"
AESTHETIC_DEFECTS = ("blank_image", "noise_image")
# Web-scale CLIPs have seen empty and noisy pictures with captions saying so; the toy sees a few too,
# so that its image embeddings set them apart from every concept (which the aesthetic head needs).
DEFECT_CAPTIONS: dict[str, tuple[str, ...]] = {
    "blank_image": ("a blank picture", "an empty grey image", "a plain background with nothing on it"),
    "noise_image": ("random noise", "a picture of coloured static", "noisy pixels"),
}


class ToyClipArchitecture(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embed_dim: int = Field(64, gt=0)
    image_size: int = Field(32, ge=16)
    patch_size: int = Field(8, gt=0)
    vision_width: int = Field(64, gt=0)
    vision_layers: int = Field(2, gt=0)
    vision_head_width: int = Field(32, gt=0)
    text_width: int = Field(64, gt=0)
    text_layers: int = Field(2, gt=0)
    text_heads: int = Field(2, gt=0)
    context_length: int = Field(16, gt=2)  # the longest ShapesWorld caption is 14 tokens

    def open_clip_config(self) -> dict:
        """open_clip's model config (what `open_clip.add_model_config` reads)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                "layers": self.vision_layers, "head_width": self.vision_head_width,
            },
            "text_cfg": {
                "context_length": self.context_length, "vocab_size": open_clip.SimpleTokenizer().vocab_size,
                "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
            },
        }


class ToyAestheticBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train_samples: int = Field(1000, gt=0)
    eval_samples: int = Field(400, gt=0)
    defect_rate: float = Field(0.5, gt=0, lt=1)  # share of blank / noise images among the samples
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    clean_score: float = 7.0  # on LAION's 1-10 scale, so curation thresholds read alike
    defect_score: float = 1.0


class ToyClipConfig(BaseModel):
    """Everything that decides the toy CLIP and its aesthetic head; its hash keys the cache."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    train_samples: int = Field(4000, gt=0)
    defect_samples: int = Field(800, ge=0)  # extra pairs: blank / noise images and captions saying so
    eval_samples: int = Field(500, gt=0)
    architecture: ToyClipArchitecture = Field(default_factory=ToyClipArchitecture)
    steps: int = Field(400, gt=0)
    batch_size: int = Field(128, gt=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    aesthetic: ToyAestheticBuild = Field(default_factory=ToyAestheticBuild)
    audio_tower: ToyAudioTowerBuild = Field(default_factory=ToyAudioTowerBuild)

    def digest(self) -> str:
        return config_hash(self)


def train_clip(
    model: open_clip.CLIP,
    pixels_NCHW: torch.Tensor,
    tokens_NL: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Contrastive training of an open_clip `CLIP` in place on preprocessed pixels and tokens of
    matched pairs (row i of each), with open_clip's symmetric InfoNCE `ClipLoss`. Batches are drawn
    with replacement from a generator seeded by `seed`; the logit scale is clamped at 100 as in
    open_clip's trainer. Returns every step's loss and leaves the model in eval mode."""
    if len(pixels_NCHW) != len(tokens_NL):
        raise ValueError(f"{len(pixels_NCHW)} images but {len(tokens_NL)} captions")
    generator = torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total=steps, warmup=min(warmup_steps, steps))
    )
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(pixels_NCHW), (batch_size,), generator=generator)
        images_BD, texts_BD, scale = model(pixels_NCHW[idx], tokens_NL[idx])
        loss = loss_fn(images_BD, texts_BD, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    positive, negative = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((positive > negative).mean() + 0.5 * (positive == negative).mean())


def mismatched_captions(scenes: Sequence, *, seed: int) -> list[str]:
    """For each scene a caption of another concept in the same wording and layout (as the
    `mismatched_caption` defect makes them)."""
    rng = np.random.default_rng(seed)
    concepts = all_concepts()
    out = []
    for scene in scenes:
        others = [c for c in concepts if c != scene.concept]
        out.append(render_captions([replace(scene, concept=others[rng.integers(len(others))])])[0])
    return out


@torch.inference_mode()
def _embed_images(clip: OpenClip, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([
        clip.embed_images(torch.stack([clip.preprocess(im) for im in images[i : i + batch_size]]))
        for i in range(0, len(images), batch_size)
    ])


@torch.inference_mode()
def clip_separation(clip: OpenClip, n: int, *, seed: int, image_size: int) -> dict[str, float]:
    """How well matched ShapesWorld pairs outscore mismatched ones, on `n` fresh scenes."""
    scenes = sample_scenes(sample_concepts(n, seed=seed, pairs=all_concepts()), seed=seed)
    images = _embed_images(clip, [Image.fromarray(a) for a in render_images(scenes, size=image_size)])
    matched = clip.similarity(images, clip.embed_texts(render_captions(scenes))).numpy()
    mismatched = clip.similarity(images, clip.embed_texts(mismatched_captions(scenes, seed=seed))).numpy()
    return {
        "auc": auc(matched, mismatched),
        "per_image": float((matched > mismatched).mean()),  # the matched caption wins for its own image
        "matched_mean": float(matched.mean()),
        "mismatched_mean": float(mismatched.mean()),
    }


def _aesthetic_data(
    clip: OpenClip, cfg: ToyAestheticBuild, n: int, *, seed: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image embeddings of clean, blank and noise records, and which are clean (N,) bool."""
    rows = make_records(n, seed=seed, defect_rate=cfg.defect_rate, defects=AESTHETIC_DEFECTS, image_size=size)
    embeds = _embed_images(clip, [decode_image(r["image"]) for r in rows])
    clean = torch.tensor([r["defect"] is None for r in rows])
    return embeds, clean


@torch.inference_mode()
def aesthetic_separation(
    clip: OpenClip, head: AestheticHead, cfg: ToyAestheticBuild, *, seed: int, size: int
) -> dict[str, float]:
    """Scores of clean vs blank / noise images (fresh samples) under the head."""
    embeds, clean = _aesthetic_data(clip, cfg, cfg.eval_samples, seed=seed, size=size)
    scores = head(embeds).numpy()
    good, bad = scores[clean.numpy()], scores[~clean.numpy()]
    threshold = (cfg.clean_score + cfg.defect_score) / 2
    return {
        "auc": auc(good, bad), "clean_mean": float(good.mean()), "clean_min": float(good.min()),
        "defect_mean": float(bad.mean()), "defect_max": float(bad.max()), "threshold": threshold,
        # share of images on the right side of the midpoint between the two target scores
        "accuracy": float(((scores >= threshold) == clean.numpy()).mean()),
    }


# The scoring configs, with paths relative to the build directory.
CLIP_ENTRY = {"model_name": MODEL_NAME, "config_file": f"{MODEL_NAME}.json", "pretrained": CHECKPOINT}
AESTHETIC_ENTRY = {"version": "v2", "weights": AESTHETIC_WEIGHTS}


def training_pairs(config: ToyClipConfig) -> tuple[list[Image.Image], list[str]]:
    """ShapesWorld scenes with their captions, plus `defect_samples` blank / noise images (made as
    the curation defects are) captioned as such."""
    seed, size = config.seed, config.architecture.image_size
    scenes = sample_scenes(sample_concepts(config.train_samples, seed=seed, pairs=all_concepts()), seed=seed)
    images = [Image.fromarray(a) for a in render_images(scenes, size=size)]
    captions = render_captions(scenes)
    if config.defect_samples:
        rng = np.random.default_rng(seed)
        rows = make_records(
            config.defect_samples, seed=seed + 4, defect_rate=1.0, defects=AESTHETIC_DEFECTS, image_size=size
        )
        images += [decode_image(r["image"]) for r in rows]
        captions += [DEFECT_CAPTIONS[r["defect"]][rng.integers(len(DEFECT_CAPTIONS[r["defect"]]))] for r in rows]
    return images, captions


def _clip_config(root: Path, entry: dict) -> ClipConfig:
    return ClipConfig(
        **{**entry, "config_file": str(root / entry["config_file"]), "pretrained": str(root / entry["pretrained"])}
    )


def _aesthetic_config(root: Path, entry: dict) -> AestheticConfig:
    return AestheticConfig(**{**entry, "weights": str(root / entry["weights"])})


def toy_scoring_configs(root: str | Path) -> tuple[ClipConfig, AestheticConfig]:
    """The `ClipConfig` and `AestheticConfig` (absolute paths) of the toy models in `root`.

    Example:
        >>> clip_config, aesthetic_config = toy_scoring_configs("runs/toy/clip")
        >>> clip = omniflow.scoring.clip.load_clip(clip_config)
    """
    root = Path(root).resolve()
    manifest = json.loads((root / MANIFEST).read_text())
    return _clip_config(root, manifest["clip"]), _aesthetic_config(root, manifest["aesthetic"])


def _pooled_set(manifest: dict, pooled_dim: int | None = None) -> dict[str, dict]:
    """The pooled-encoder configs of a build, paths relative to its directory."""
    entry = manifest["clip"]
    common = {"path": ".", "model_name": entry["model_name"], "config_file": entry["config_file"],
              "pretrained": entry["pretrained"], "pooled_dim": pooled_dim or manifest["embed_dim"]}
    tower = manifest["audio_tower"]
    return {Modality.IMAGE.value: {"kind": "open-clip-image-pooled", **common},
            Modality.TEXT.value: {"kind": "open-clip-text-pooled", **common},
            Modality.AUDIO.value: {**tower, "pooled_dim": common["pooled_dim"]}}


def _write_codec_set(root: Path, manifest: dict) -> None:
    """`root/codecs.json`: the build as a codec set (`omniflow.codecs.read_codec_set`), so that a
    job's `codec_sets` takes its pooled encoders. Derived from the manifest; an older build gets
    it on its next use."""
    index = root / CODEC_SET
    if "audio_tower" in manifest and not index.is_file():
        index.write_text(json.dumps({"pooled": _pooled_set(manifest)}, indent=2))


def toy_pooled_configs(root: str | Path, pooled_dim: int | None = None) -> dict[Modality, dict]:
    """Pooled-encoder configs of the toy CLIP in `root` (image and text) and of its audio tower
    (audio, in the CLIP's text space): the ShapesWorld counterpart of the CLIP and LanguageBind
    vectors OmniFlow conditions on. Vectors are the CLIP's embedding width unless `pooled_dim` pads
    them wider (sampling and training pad them to the model's width).

    Example:
        >>> encoders = {m: build_codec(c) for m, c in toy_pooled_configs("runs/toy/clip").items()}
    """
    root = Path(root).resolve()
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{root} has no {MANIFEST}; build it with `python -m shapesworld.toy build-clip --out {root}`")
    manifest = json.loads((root / MANIFEST).read_text())
    if "audio_tower" not in manifest:
        raise ValueError(f"{root} was built without the audio tower; rebuild it with "
                         f"`python -m shapesworld.toy build-clip --out {root}`")
    return {Modality(m): {**c, "path": str(root / c["path"])} for m, c in _pooled_set(manifest, pooled_dim).items()}


def build_toy_clip(
    out: str | Path, config: ToyClipConfig | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Train the toy CLIP, its aesthetic head and its audio tower (`shapesworld.toy.audio_tower`) into
    `out` (or reuse them when `out` holds this config's build). Returns the manifest: the scoring
    configs and the tower's pooled-encoder config (paths relative to `out`), the held-out
    separation of CLIP, aesthetic and audio-tower scores, timings and the config hash.

    Example:
        >>> manifest = build_toy_clip("runs/toy/clip")
        >>> manifest["clip_eval"]["auc"]   # matched vs mismatched caption AUC, held out
    """
    config = config or ToyClipConfig()
    out = Path(out)
    cached = cached_manifest(out, MANIFEST, config.digest(), force=force, what="toy CLIP", log=log)
    if cached is not None:
        _write_codec_set(out, cached)
        return cached
    staging = new_staging(out)

    start = time.perf_counter()
    arch = config.architecture
    (staging / f"{MODEL_NAME}.json").write_text(json.dumps(arch.open_clip_config(), indent=2))
    clip_config = _clip_config(staging.resolve(), CLIP_ENTRY)
    with torch.random.fork_rng():  # open_clip initialises from the global generator
        torch.manual_seed(config.seed)
        clip = load_clip(clip_config.model_copy(update={"pretrained": None}))

    images, captions = training_pairs(config)
    pixels = torch.stack([clip.preprocess(image) for image in images])
    tokens = clip.tokenizer(captions)
    every = max(1, config.steps // 5)
    t0 = time.perf_counter()
    clip.model.requires_grad_(True)
    losses = train_clip(
        clip.model, pixels, tokens, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, seed=config.seed,
        progress=lambda s, loss: (s + 1) % every == 0 and log(f"[clip] step {s + 1}/{config.steps} loss {loss:.4f}"),
    )
    clip.model.requires_grad_(False)
    seconds = {"clip": round(time.perf_counter() - t0, 1)}
    save_file(clip.model.state_dict(), staging / CHECKPOINT)

    # everything below runs on the saved files, loaded like released weights
    clip = load_clip(clip_config)
    clip_eval = clip_separation(clip, config.eval_samples, seed=config.seed + 1, image_size=arch.image_size)
    log(f"[clip] held-out matched vs mismatched caption AUC {clip_eval['auc']:.4f}")

    t0 = time.perf_counter()
    cfg = config.aesthetic
    embeds, clean = _aesthetic_data(clip, cfg, cfg.train_samples, seed=config.seed + 2, size=arch.image_size)
    targets = torch.where(clean, cfg.clean_score, cfg.defect_score)
    head = new_aesthetic_head("v2", clip.embed_dim, seed=config.seed)
    train_aesthetic_head(
        head, embeds, targets, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=config.seed
    )
    save_aesthetic_head(head, staging / AESTHETIC_WEIGHTS)
    seconds["aesthetic"] = round(time.perf_counter() - t0, 1)
    head = load_aesthetic_head(_aesthetic_config(staging, AESTHETIC_ENTRY))
    aesthetic_eval = aesthetic_separation(clip, head, cfg, seed=config.seed + 3, size=arch.image_size)
    log(f"[aesthetic] held-out clean vs blank/noise AUC {aesthetic_eval['auc']:.4f} "
        f"(clean min {aesthetic_eval['clean_min']:.2f}, defect max {aesthetic_eval['defect_max']:.2f})")

    t0 = time.perf_counter()
    tower = build_audio_tower(clip, config.audio_tower, staging, seed=config.seed, log=log)
    seconds["audio_tower"] = round(time.perf_counter() - t0, 1)

    manifest = {
        "config_hash": config.digest(),
        "config": config.model_dump(mode="json"),
        "clip": CLIP_ENTRY,
        "aesthetic": AESTHETIC_ENTRY,
        "embed_dim": clip.embed_dim,
        "final_loss": round(float(np.mean(losses[-max(1, config.steps // 20):])), 4),
        "clip_eval": clip_eval,
        "aesthetic_eval": aesthetic_eval,
        "audio_tower": tower["entry"],
        "audio_tower_eval": tower["eval"],
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
    }
    _write_codec_set(staging, manifest)
    return commit(staging, out, MANIFEST, manifest)
