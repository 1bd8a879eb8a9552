"""Curation rules as pure functions over a table of scored samples.

`decide` gives every sample a status (kept, filtered, rejected) and, for those not kept, the
stage and reason. Rules run in a fixed order per source, each on the samples the previous rules
kept: rejected input first, then minimum resolution and duration, caption length, absolute score
thresholds, DataComp-style top-k% per score, exact duplicates by content hash (the first key in
sorted order survives), and last, when configured, near duplicates by CLIP image embedding (the
sample with the best CLIP score survives; see `pipelines.near_duplicates`). Top-k% thresholds are quantiles over the samples still alive at that
point, so they are reported with the decisions.
"""

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipelines.near_duplicates import near_duplicate_mask
from pipelines.schema import FILTERED, KEPT, REJECTED

SCORES = ("clip_score", "aesthetic_score", "clap_score")


class FilterConfig(BaseModel):
    """Per-source filters; a rule left at None is off.

    Example (YAML):
        filters: {min_clip_score: 0.25, aesthetic_top_percent: 80, min_image_side: 256}
    """

    model_config = ConfigDict(extra="forbid")
    min_image_side: int | None = Field(None, ge=1, description="shorter image side, pixels")
    min_audio_seconds: float | None = Field(None, ge=0)
    min_caption_chars: int | None = Field(None, ge=0)
    max_caption_chars: int | None = Field(None, ge=1)
    min_clip_score: float | None = None
    min_aesthetic_score: float | None = None
    min_clap_score: float | None = None
    clip_top_percent: float | None = Field(None, gt=0, le=100)
    aesthetic_top_percent: float | None = Field(None, gt=0, le=100)
    clap_top_percent: float | None = Field(None, gt=0, le=100)
    dedupe_exact: bool = True
    near_duplicate_cosine: float | None = Field(
        None, gt=0, le=1, description="drop images whose CLIP embedding is this close to a better one's"
    )
    near_duplicate_cluster_size: int = Field(50_000, ge=2, description="greedy dedupe runs within clusters this big")


@dataclass
class Decisions:
    """One row per input sample (key, status, stage, reason) and the thresholds that were used."""

    table: pa.Table
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)


def _null_or(values: pa.ChunkedArray, fill: float) -> np.ndarray:
    return pc.fill_null(values.cast(pa.float64()), fill).to_numpy(zero_copy_only=False)


def _near_duplicates(scored: pa.Table, alive: np.ndarray, rules: FilterConfig) -> tuple[np.ndarray, str]:
    """Which of the `alive` rows with an image embedding duplicate a better-scored one."""
    if "image_embedding" not in scored.column_names:
        raise ValueError("near_duplicate_cosine needs image embeddings: configure CLIP scoring")
    embedded = alive & scored.column("image_embedding").is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(embedded)
    near = np.zeros(len(alive), bool)
    if len(rows):
        vectors = scored.column("image_embedding").take(pa.array(rows)).combine_chunks()
        x_ND = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), -1)
        quality = _null_or(scored.column("clip_score").take(pa.array(rows)), np.nan)
        near[rows] = near_duplicate_mask(
            x_ND, quality, threshold=rules.near_duplicate_cosine, cluster_size=rules.near_duplicate_cluster_size
        )
    return near, f"image embedding within cosine {rules.near_duplicate_cosine} of a better-scored sample"


def decide(scored: pa.Table, filters: dict[str, FilterConfig]) -> Decisions:
    """Decide every sample of `scored` (columns of `schema.SCORED_SAMPLE`) by its source's filters."""
    order = pc.sort_indices(scored, [("key", "ascending")])
    scored = scored.take(order)
    n = scored.num_rows
    status = np.full(n, KEPT, dtype=object)
    stage = np.full(n, None, dtype=object)
    reason = np.full(n, None, dtype=object)

    rejected = scored.column("reject_reason").is_valid().to_numpy(zero_copy_only=False)
    status[rejected] = REJECTED
    stage[rejected] = scored.column("reject_stage").to_numpy(zero_copy_only=False)[rejected]
    reason[rejected] = scored.column("reject_reason").to_numpy(zero_copy_only=False)[rejected]

    def drop(mask: np.ndarray, rule: str, why: str | np.ndarray) -> None:
        hit = mask & (status == KEPT)
        status[hit], stage[hit] = FILTERED, rule
        reason[hit] = why[hit] if isinstance(why, np.ndarray) else why

    sources = scored.column("source").to_numpy(zero_copy_only=False)
    thresholds: dict[str, dict[str, float]] = {}
    for source in sorted(set(sources)):
        rules = filters.get(source, FilterConfig())
        mine = sources == source
        if rules.min_image_side is not None:
            width = _null_or(scored.column("image_width"), np.inf)
            height = _null_or(scored.column("image_height"), np.inf)
            side = np.minimum(width, height)
            drop(mine & (side < rules.min_image_side), "min_image_side",
                 np.array([f"image side {s:.0f} px < {rules.min_image_side}" for s in side], dtype=object))
        if rules.min_audio_seconds is not None:
            seconds = _null_or(scored.column("audio_seconds"), np.inf)
            drop(mine & (seconds < rules.min_audio_seconds), "min_audio_seconds",
                 f"audio shorter than {rules.min_audio_seconds} s")
        chars = pc.fill_null(pc.utf8_length(scored.column("caption")), -1).to_numpy(zero_copy_only=False)
        has_caption = chars >= 0
        if rules.min_caption_chars is not None:
            drop(mine & has_caption & (chars < rules.min_caption_chars), "min_caption_chars",
                 f"caption shorter than {rules.min_caption_chars} characters")
        if rules.max_caption_chars is not None:
            drop(mine & has_caption & (chars > rules.max_caption_chars), "max_caption_chars",
                 f"caption longer than {rules.max_caption_chars} characters")
        for score in SCORES:
            name = score.removesuffix("_score")
            values = scored.column(score)
            present = values.is_valid().to_numpy(zero_copy_only=False)
            x = _null_or(values, np.nan)
            minimum = getattr(rules, f"min_{score}")
            if minimum is not None:
                drop(mine & present & (x < minimum), f"min_{score}", f"{score} below {minimum}")
                thresholds.setdefault(source, {})[f"min_{score}"] = float(minimum)
            top = getattr(rules, f"{name}_top_percent")
            if top is not None:
                alive = mine & present & (status == KEPT)
                if alive.any():
                    cut = float(np.quantile(x[alive], 1 - top / 100))
                    thresholds.setdefault(source, {})[f"{name}_top_{top:g}%"] = cut
                    drop(alive & (x < cut), f"{name}_top_percent", f"{score} below the top {top:g}% cut {cut:.4f}")
        if rules.dedupe_exact:
            hashes = scored.column("content_hash").to_numpy(zero_copy_only=False)
            seen: set[str] = set()
            duplicate = np.zeros(n, dtype=bool)
            for i in np.flatnonzero(mine & (status == KEPT)):
                if hashes[i] is not None:
                    duplicate[i] = hashes[i] in seen
                    seen.add(hashes[i])
            drop(duplicate, "duplicate", "exact duplicate of an earlier sample")
        if rules.near_duplicate_cosine is not None:
            near, why = _near_duplicates(scored, mine & (status == KEPT), rules)
            drop(near, "near_duplicate", why)

    table = pa.table(
        {
            "key": scored.column("key"),
            "source": scored.column("source"),
            "sample_id": scored.column("sample_id"),
            "status": pa.array(status.tolist(), pa.string()),
            "stage": pa.array(stage.tolist(), pa.string()),
            "reason": pa.array(reason.tolist(), pa.string()),
        }
    )
    return Decisions(table=table, thresholds=thresholds)
