"""Ray Data scoring stages: CLIP image-text and aesthetic scores, CLAP audio-text scores.

Each model gets two stages so that each scales on its own: a CPU stage that decodes the media and
makes the model's fixed-shape input (`ClipPreprocess`, `ClapPreprocess`) and an actor stage that
loads the model once and runs batched inference on a GPU or the CPU (`ClipScorer`, `ClapScorer`).
Batches are pyarrow tables with the columns of `pipelines.schema.SCORED_SAMPLE`. A row that an
earlier stage rejected (`reject_reason` not null) passes through with null scores; media that fail
to decode here reject their row at stage "score" instead of raising. A score is null where its
row lacks the media or the caption.

    >>> config = ClipScoringConfig(clip={"model_name": "ViT-L-14-quickgelu", "pretrained": "openai"},
    ...                            aesthetic={"version": "v2", "weights": "sac+logos+ava1-l14-linearMSE.pth"},
    ...                            scorer={"num_gpus": 1, "concurrency": 4, "batch_size": 128})
    >>> ds = add_clip_scoring(ds, config)   # adds clip_score and aesthetic_score
"""

import logging
import re
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import torch
from pydantic import BaseModel, ConfigDict, Field

from omniflow.codecs.media import MediaError, decode_audio, decode_image
from omniflow.scoring.aesthetic import AestheticConfig, load_aesthetic_head
from omniflow.scoring.clap import (
    AudioFeatures,
    ClapConfig,
    audio_features,
    load_clap,
    load_feature_extractor,
)
from omniflow.scoring.clip import ClipConfig, clip_transform, load_clip, preprocess_config
from pipelines.resources import StageResources, resolve_device
from pipelines.rows import rejects, set_column, tensor_rows, with_rejects
from pipelines.schema import SCORED_SAMPLE, tensor_column

logger = logging.getLogger(__name__)

IMAGE, CAPTION, AUDIO = (SCORED_SAMPLE.field(n) for n in ("image", "caption", "audio"))
CLIP_SCORE, AESTHETIC_SCORE, CLAP_SCORE, IMAGE_EMBEDDING = (
    SCORED_SAMPLE.field(n) for n in ("clip_score", "aesthetic_score", "clap_score", "image_embedding")
)
SCORE_STAGE = "score"  # the reject_stage of media that fail to decode here
# Model inputs passed from a preprocessing stage to its scorer; the scorer drops them.
CLIP_PIXELS = "clip_pixels"  # (3, S, S) float32, zeros where the row has no image
CLAP_FEATURES = "clap_features"  # (channels, frames, mel bins) float32
CLAP_IS_LONGER = "clap_is_longer"
# Text encoders read a few hundred tokens (CLIP 77, CLAP 512), but tokenizers work on the whole
# caption, and BPE is quadratic in a word's length (open_clip takes 4 s for one 20,000-letter word).
# So a caption is cut to what a context could use and runs of non-space characters longer than
# any word are split before tokenising; captions within both bounds are tokenised unchanged.
MAX_TOKENIZED_CHARS = 4096
MAX_WORD_CHARS = 64
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS}}}(?=\S)")


class ClipScoringConfig(BaseModel):
    """The CLIP model, the optional aesthetic head on its image embeddings, and both stages."""

    model_config = ConfigDict(extra="forbid")
    clip: ClipConfig = Field(default_factory=ClipConfig)
    aesthetic: AestheticConfig | None = None
    preprocess: StageResources = Field(default_factory=lambda: StageResources(device="cpu"))
    scorer: StageResources = Field(default_factory=StageResources)


class ClapScoringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clap: ClapConfig = Field(default_factory=ClapConfig)
    preprocess: StageResources = Field(default_factory=lambda: StageResources(device="cpu"))
    scorer: StageResources = Field(default_factory=StageResources)


# ---- batch helpers -------------------------------------------------------------------------


def _scores(n: int, rows: np.ndarray, values: torch.Tensor, field: pa.Field) -> pa.Array:
    """A column of `n` nulls with `values` at `rows`."""
    out = np.zeros(n, np.float32)
    out[rows] = values.cpu().numpy()
    mask = np.ones(n, bool)
    mask[rows] = False
    return pa.array(out, field.type, mask=mask)


def _vectors(n: int, rows: np.ndarray, values_RD: torch.Tensor, field: pa.Field) -> pa.Array:
    """A list column of `n` rows: the vectors of `values_RD` at `rows` (in order), null elsewhere."""
    lengths = np.zeros(n, np.int32)
    lengths[rows] = values_RD.shape[1] if len(rows) else 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(values_RD.cpu().numpy().astype(np.float16).reshape(-1))
    mask = np.ones(n, bool)
    mask[rows] = False
    return pa.ListArray.from_arrays(offsets, values, type=field.type, mask=pa.array(mask))


def tokenizer_text(caption: str) -> str:
    """`caption` as a text encoder's tokenizer gets it: at most `MAX_TOKENIZED_CHARS` characters,
    runs of non-space characters broken every `MAX_WORD_CHARS`, so tokenising is linear.

        >>> tokenizer_text("a red circle") == "a red circle"
        True
    """
    return _LONG_WORD.sub(r"\g<0> ", caption[:MAX_TOKENIZED_CHARS])


# ---- CLIP ------------------------------------------------------------------------------------


class ClipPreprocess:
    """CPU stage: decode `image` bytes and apply the CLIP model's preprocessing into `clip_pixels`.

    Needs only the model's preprocessing config, not its weights.
    """

    def __init__(self, config: dict):
        self.config = ClipScoringConfig.model_validate(config)
        self.transform = clip_transform(self.config.clip)
        self.pixel_shape = (3, *preprocess_config(self.config.clip)["size"])

    @classmethod
    def map_batches_kwargs(cls, config: ClipScoringConfig) -> dict[str, Any]:
        return config.preprocess.map_batches_kwargs({"config": config.model_dump(mode="json")})

    def __call__(self, batch: pa.Table) -> pa.Table:
        stage, reason = rejects(batch)
        pixels = np.zeros((batch.num_rows, *self.pixel_shape), np.float32)
        for i, data in enumerate(batch.column(IMAGE.name).to_pylist()):
            if data is None or reason[i] is not None:
                continue
            try:
                pixels[i] = self.transform(decode_image(data)).numpy()
            except MediaError as err:
                stage[i], reason[i] = SCORE_STAGE, str(err)
        batch = with_rejects(batch, stage, reason)
        return set_column(batch, CLIP_PIXELS, tensor_column(CLIP_PIXELS, pixels, pa.float32()))


class ClipScorer:
    """Actor stage: `clip_score` (image-caption cosine), `aesthetic_score` and `image_embedding`
    from `clip_pixels`.

    The model loads once per actor. `aesthetic_score` is null when no aesthetic head is configured;
    `clip_pixels` is dropped from the output.
    """

    def __init__(self, config: dict):
        self.config = ClipScoringConfig.model_validate(config)
        self.device = resolve_device(self.config.scorer.device)
        self.clip = load_clip(self.config.clip, device=self.device)
        self.aesthetic = None
        if self.config.aesthetic is not None:
            self.aesthetic = load_aesthetic_head(self.config.aesthetic).to(self.device)
        logger.info("ClipScorer: %s on %s", self.config.clip.model_name, self.device)

    @classmethod
    def map_batches_kwargs(cls, config: ClipScoringConfig) -> dict[str, Any]:
        return config.scorer.map_batches_kwargs({"config": config.model_dump(mode="json")})

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        _, reason = rejects(batch)
        images = batch.column(IMAGE.name).is_valid().to_numpy(zero_copy_only=False)
        captions = batch.column(CAPTION.name).to_pylist()
        alive = np.array([r is None for r in reason], bool)
        with_image = np.flatnonzero(alive & images)
        with_pair = np.array([i for i in with_image if captions[i] is not None], dtype=np.int64)

        clip_scores = aesthetic_scores = torch.zeros(0)
        image_embeds = torch.zeros(0, 0)
        if len(with_image):
            pixels = torch.from_numpy(tensor_rows(batch, CLIP_PIXELS)[with_image])
            image_embeds = self.clip.embed_images(pixels)
            if self.aesthetic is not None:
                aesthetic_scores = self.aesthetic(image_embeds)
            if len(with_pair):
                paired = image_embeds[np.searchsorted(with_image, with_pair)]
                texts = [tokenizer_text(captions[i]) for i in with_pair]
                clip_scores = self.clip.similarity(paired, self.clip.embed_texts(texts))
        out = batch.drop_columns([CLIP_PIXELS])
        out = set_column(out, CLIP_SCORE, _scores(n, with_pair, clip_scores, CLIP_SCORE))
        out = set_column(out, IMAGE_EMBEDDING, _vectors(n, with_image, image_embeds, IMAGE_EMBEDDING))
        aesthetic_rows = with_image if self.aesthetic is not None else np.zeros(0, np.int64)
        return set_column(out, AESTHETIC_SCORE, _scores(n, aesthetic_rows, aesthetic_scores, AESTHETIC_SCORE))


def add_clip_scoring(ds: "ray.data.Dataset", config: ClipScoringConfig) -> "ray.data.Dataset":
    """`ds` with `clip_score` and `aesthetic_score` added by the two CLIP stages."""
    ds = ds.map_batches(ClipPreprocess, **ClipPreprocess.map_batches_kwargs(config))
    return ds.map_batches(ClipScorer, **ClipScorer.map_batches_kwargs(config))


# ---- CLAP ------------------------------------------------------------------------------------


class ClapPreprocess:
    """CPU stage: decode `audio` bytes, resample to CLAP's rate and compute its log-mel features
    into `clap_features` and `clap_is_longer` (zeros / false where the row has no audio)."""

    def __init__(self, config: dict):
        self.config = ClapScoringConfig.model_validate(config)
        self.extractor = load_feature_extractor(self.config.clap)
        rate = self.extractor.sampling_rate
        probe = audio_features(self.extractor, [(np.full(rate, 0.1, np.float32), rate)])
        self.feature_shape = tuple(probe.input_features.shape[1:])

    @classmethod
    def map_batches_kwargs(cls, config: ClapScoringConfig) -> dict[str, Any]:
        return config.preprocess.map_batches_kwargs({"config": config.model_dump(mode="json")})

    def __call__(self, batch: pa.Table) -> pa.Table:
        stage, reason = rejects(batch)
        rows, waves = [], []
        for i, data in enumerate(batch.column(AUDIO.name).to_pylist()):
            if data is None or reason[i] is not None:
                continue
            try:
                waves.append(decode_audio(data))
                rows.append(i)
            except MediaError as err:
                stage[i], reason[i] = SCORE_STAGE, str(err)
        features = np.zeros((batch.num_rows, *self.feature_shape), np.float32)
        is_longer = np.zeros(batch.num_rows, bool)
        if rows:
            computed = audio_features(self.extractor, waves)
            features[rows] = computed.input_features.numpy()
            is_longer[rows] = computed.is_longer.numpy().reshape(-1)
        out = with_rejects(batch, stage, reason)
        out = set_column(out, CLAP_FEATURES, tensor_column(CLAP_FEATURES, features, pa.float32()))
        return set_column(out, CLAP_IS_LONGER, pa.array(is_longer))


class ClapScorer:
    """Actor stage: `clap_score` (audio-caption cosine) for live rows with audio and a caption."""

    def __init__(self, config: dict):
        self.config = ClapScoringConfig.model_validate(config)
        self.device = resolve_device(self.config.scorer.device)
        self.clap = load_clap(self.config.clap, device=self.device)

    @classmethod
    def map_batches_kwargs(cls, config: ClapScoringConfig) -> dict[str, Any]:
        return config.scorer.map_batches_kwargs({"config": config.model_dump(mode="json")})

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        _, reason = rejects(batch)
        audio = batch.column(AUDIO.name).is_valid().to_numpy(zero_copy_only=False)
        captions = batch.column(CAPTION.name).to_pylist()
        rows = np.array(
            [i for i in range(batch.num_rows) if audio[i] and reason[i] is None and captions[i] is not None],
            dtype=np.int64,
        )
        scores = torch.zeros(0)
        if len(rows):
            features = AudioFeatures(
                input_features=torch.from_numpy(tensor_rows(batch, CLAP_FEATURES)[rows]),
                is_longer=torch.from_numpy(batch.column(CLAP_IS_LONGER).to_numpy()[rows]).reshape(-1, 1),
            )
            scores = self.clap.similarity(
                self.clap.embed_features(features),
                self.clap.embed_texts([tokenizer_text(captions[i]) for i in rows]),
            )
        out = batch.drop_columns([CLAP_FEATURES, CLAP_IS_LONGER])
        return set_column(out, CLAP_SCORE, _scores(batch.num_rows, rows, scores, CLAP_SCORE))


def add_clap_scoring(ds: "ray.data.Dataset", config: ClapScoringConfig) -> "ray.data.Dataset":
    """`ds` with `clap_score` added by the two CLAP stages."""
    ds = ds.map_batches(ClapPreprocess, **ClapPreprocess.map_batches_kwargs(config))
    return ds.map_batches(ClapScorer, **ClapScorer.map_batches_kwargs(config))
