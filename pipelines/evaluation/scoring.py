"""Scoring for evaluation on Ray Data: the feature extractors, held by an actor stage.

`Embedders` loads what `MetricsConfig` names (every model from a local or `s3://` path) and turns
media into vectors: image features for FID (InceptionV3 pool features, or CLIP image embeddings),
audio features for FAD, and the paired embeddings of CLIP score and CLAP score. `ScoreStage`
gives each generated sample its per-sample scores and the feature vector of its target (which
the driver folds into the Fréchet statistics); `ReferenceStage` gives the benchmark's own images
or clips their feature vectors, once per benchmark and extractor (`jobs.evaluate` caches them).
A concept checker (`checkers`, the toy domain's) reads the generated output and the row's
caption back and says which attributes agree.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from omniflow import storage as st
from omniflow.codecs.base import build_codec
from omniflow.codecs.media import decode_image
from omniflow.metrics import clip_score, inception_features
from omniflow.modality import Modality
from omniflow.scoring.clap import load_clap
from omniflow.scoring.clip import load_clip
from omniflow.scoring.image_reward import load_image_reward
from omniflow.tasks import get_task
from pipelines.evaluation.config import MetricsConfig
from pipelines.evaluation.generate import GENERATED_COLUMN
from pipelines.plugins import CHECKERS, load_named
from pipelines.resources import resolve_device
from pipelines.schema import MEDIA_COLUMN

INCEPTION_SIZE = 299
FEATURES = "features"  # the column of feature vectors a stage adds for the driver

# (modality, generated outputs, reference captions) -> per sample, attribute -> agrees
Checker = Callable[[str, Sequence[Any], Sequence[str]], list[dict[str, bool]]]


def load_checker(name: str) -> Checker:
    """The concept checker an installed package names (`pipelines.plugins.CHECKERS`)."""
    return load_named(CHECKERS, name)


def extractor_id(metrics: MetricsConfig, modality: Modality) -> str | None:
    """What makes the feature vectors of `modality` comparable across runs (their cache's name),
    or None when the config measures no distance for it."""
    if modality == Modality.IMAGE and metrics.image_features == "inception":
        what = {"inception": metrics.inception_weights}
    elif modality == Modality.IMAGE and metrics.image_features == "clip":
        what = {"clip": metrics.clip.model_dump(mode="json")}
    elif modality == Modality.AUDIO and metrics.audio_features == "clap":
        what = {"clap": metrics.clap.model_dump(mode="json")}
    elif modality == Modality.AUDIO and metrics.audio_features == "audio_tower":
        what = {"audio_tower": metrics.audio_tower}
    else:
        return None
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return f"{next(iter(what))}-{digest}"


class Embedders:
    """The models `MetricsConfig` names, loaded on `device`, and the vectors they give."""

    def __init__(self, metrics: MetricsConfig, *, device: torch.device, storage: st.StorageConfig):
        self.metrics, self.device = metrics, device
        local_dir = lambda path: st.local_copy(path, storage)
        self.clip = load_clip(metrics.clip, device=device) if metrics.clip else None
        self.inception = None
        if metrics.image_features == "inception":
            self.inception = inception_features(st.local_file(metrics.inception_weights, storage)).to(device).eval()
        self.image_reward = None
        if metrics.image_reward is not None:
            where = metrics.image_reward.model_copy(update={"path": local_dir(metrics.image_reward.path)})
            self.image_reward = load_image_reward(where, device=device)
        self.clap = load_clap(metrics.clap.model_copy(update={"path": local_dir(metrics.clap.path)}), device=device) \
            if metrics.clap else None
        self.audio_tower = None
        if metrics.audio_tower is not None:
            tower = dict(metrics.audio_tower)
            self.audio_tower = build_codec({**tower, "path": local_dir(tower["path"]), "device": str(device)})

    @torch.no_grad()
    def image_features(self, images: Sequence[bytes], *, clip_BD: torch.Tensor | None = None) -> np.ndarray:
        """(B, D) float32 vectors for FID (`clip_BD`: the images' CLIP embeddings, when already made)."""
        if self.metrics.image_features == "clip":
            return (clip_BD if clip_BD is not None else self.clip_images(images)).cpu().numpy()
        decoded = [decode_image(b).convert("RGB") for b in images]
        pixels = np.stack([np.asarray(im.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)) for im in decoded])
        pixels_BCHW = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(self.device)
        return self.inception(pixels_BCHW).float().cpu().numpy()

    @torch.no_grad()
    def audio_features(self, clips: Sequence[bytes]) -> np.ndarray:
        """(B, D) float32 vectors for FAD."""
        return self._audio(clips, self.metrics.audio_features).cpu().numpy()

    @torch.no_grad()
    def clip_images(self, images: Sequence[bytes]) -> torch.Tensor:
        """(B, D) unit CLIP embeddings of encoded images."""
        decoded = [decode_image(b).convert("RGB") for b in images]
        return self.clip.embed_images(torch.stack([self.clip.preprocess(im) for im in decoded]))

    @torch.no_grad()
    def clip_scores(self, images: Sequence[bytes], captions: Sequence[str], *,
                    clip_BD: torch.Tensor | None = None) -> np.ndarray:
        images_BD = clip_BD if clip_BD is not None else self.clip_images(images)
        return clip_score(images_BD, self.clip.embed_texts(list(captions))).cpu().numpy()

    def image_rewards(self, images: Sequence[bytes], captions: Sequence[str]) -> np.ndarray:
        decoded = [decode_image(b).convert("RGB") for b in images]
        return self.image_reward.score(list(captions), decoded).numpy()

    @torch.no_grad()
    def audio_text_scores(self, clips: Sequence[bytes], captions: Sequence[str]) -> np.ndarray:
        audio = self._audio(clips, self.metrics.audio_text)
        if self.metrics.audio_text == "clap":
            texts = self.clap.embed_texts(list(captions))
        else:  # the tower's vectors live in the CLIP's text space, zero-padded past its width
            texts = self.clip.embed_texts(list(captions))
            audio = torch.nn.functional.normalize(audio[:, : texts.shape[1]], dim=-1)
        return clip_score(audio, texts).cpu().numpy()

    def _audio(self, clips: Sequence[bytes], which: str) -> torch.Tensor:
        if which == "clap":
            return self.clap.embed_audio(list(clips))
        return self.audio_tower.embed(list(clips)).float()


class ScoreStage:
    """Ray Data actor stage over generated samples of one task: per-sample scores and the feature
    vector of the target, in the columns of `pipelines.schema.EVAL_SCORE` plus `features`."""

    def __init__(self, metrics: dict[str, Any], task: str, device: str, storage: st.StorageConfig):
        self.metrics = MetricsConfig.model_validate(metrics)
        self.embedders = Embedders(self.metrics, device=resolve_device(device), storage=storage)
        self.task = get_task(task)
        (self.target,) = self.task.targets
        self.checker = load_checker(self.metrics.checkers) if self.metrics.checkers else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        target, metrics = self.target, self.metrics
        if batch.num_rows == 0:
            return batch.select(["key", "task", "seed"])
        generated = batch.column(GENERATED_COLUMN[target]).to_pylist()
        captions = batch.column("caption").to_pylist()
        out: dict[str, Any] = {"key": batch.column("key"), "task": batch.column("task"), "seed": batch.column("seed")}
        features = None
        if target == Modality.IMAGE:
            scored = metrics.clip is not None and Modality.TEXT in self.task.conditions
            # one CLIP pass serves both where FID reads CLIP features
            clip_BD = self.embedders.clip_images(generated) if scored and metrics.image_features == "clip" else None
            if metrics.image_features:
                features = self.embedders.image_features(generated, clip_BD=clip_BD)
            if scored:
                out["clip_score"] = pa.array(self.embedders.clip_scores(generated, captions, clip_BD=clip_BD),
                                             pa.float32())
            if metrics.image_reward is not None and Modality.TEXT in self.task.conditions:
                out["image_reward"] = pa.array(self.embedders.image_rewards(generated, captions), pa.float32())
        elif target == Modality.AUDIO:
            if metrics.audio_features:
                features = self.embedders.audio_features(generated)
            if metrics.audio_text and Modality.TEXT in self.task.conditions:
                out["clap_score"] = pa.array(self.embedders.audio_text_scores(generated, captions), pa.float32())
        elif self.task.conditions == (Modality.IMAGE,) and metrics.clip:  # a caption against its image
            images = batch.column(MEDIA_COLUMN[Modality.IMAGE]).to_pylist()
            out["clip_score"] = pa.array(self.embedders.clip_scores(images, generated), pa.float32())
        elif self.task.conditions == (Modality.AUDIO,) and metrics.audio_text:  # ... against its clip
            clips = batch.column(MEDIA_COLUMN[Modality.AUDIO]).to_pylist()
            out["clap_score"] = pa.array(self.embedders.audio_text_scores(clips, generated), pa.float32())
        if self.checker is not None:
            checks = self.checker(target.value, generated, captions)
            out["checks"] = pa.array([json.dumps(c, sort_keys=True) for c in checks], pa.string())
        if features is not None:
            out[FEATURES] = pa.array(list(features.astype(np.float32)), pa.list_(pa.float32()))
        return pa.table(out)


class ReferenceStage:
    """Ray Data actor stage over a benchmark's rows: the feature vectors of its `modality` (rows
    without it, or that the source could not read, give none)."""

    def __init__(self, metrics: dict[str, Any], modality: str, device: str, storage: st.StorageConfig):
        features_only = {**metrics, "image_reward": None}  # per-sample scorers are not needed here
        self.embedders = Embedders(MetricsConfig.model_validate(features_only), device=resolve_device(device),
                                   storage=storage)
        self.modality = Modality(modality)

    def __call__(self, batch: pa.Table) -> pa.Table:
        media = batch.column(MEDIA_COLUMN[self.modality]).to_pylist()
        read_ok = batch.column("reject_reason").is_null().to_pylist() if "reject_reason" in batch.column_names \
            else [True] * batch.num_rows
        rows = [i for i, (m, ok) in enumerate(zip(media, read_ok)) if m is not None and ok]
        values = [media[i] for i in rows]
        if not values:
            return pa.table({FEATURES: pa.array([], pa.list_(pa.float32()))})
        extract = self.embedders.image_features if self.modality == Modality.IMAGE else self.embedders.audio_features
        return pa.table({FEATURES: pa.array(list(extract(values).astype(np.float32)), pa.list_(pa.float32()))})
