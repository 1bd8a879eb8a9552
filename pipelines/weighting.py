"""Per-source sampling weights from quality statistics and configured priors.

The rule (OmniFlow's authors weighted their datasets by CLIP and aesthetic quality):

    w_s  proportional to  prior_s * n_s ** size_exponent * exp(quality_temperature * q_s)

n_s is the number of kept samples of source s. q_s is the source's quality: for each score that
two or more sources have, the mean kept score of s minus the mean over sources, divided by the
spread of those means (a z-score across sources), averaged over the scores; a source without
scores has q_s = 0. The weights are normalised to sum to 1. With size_exponent = 1 and a
temperature of 0 every kept sample is equally likely; with size_exponent = 0 every source is,
before quality and priors.
"""

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class WeightingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size_exponent: float = Field(0.5, ge=0, le=1)
    quality_temperature: float = Field(1.0, ge=0)
    scores: tuple[str, ...] = ("clip_score", "aesthetic_score", "clap_score")


def source_quality(mean_scores: dict[str, dict[str, float]], scores: tuple[str, ...]) -> dict[str, float]:
    """q_s per source from each source's mean kept scores (source -> score name -> mean)."""
    quality = {s: [] for s in mean_scores}
    for score in scores:
        have = {s: m[score] for s, m in mean_scores.items() if score in m and math.isfinite(m[score])}
        if len(have) < 2:
            continue
        values = np.array(list(have.values()))
        spread = values.std()
        for s, v in have.items():
            quality[s].append(0.0 if spread == 0 else (v - values.mean()) / spread)
    return {s: float(np.mean(q)) if q else 0.0 for s, q in quality.items()}


def source_weights(
    kept: dict[str, int],
    mean_scores: dict[str, dict[str, float]],
    priors: dict[str, float],
    config: WeightingConfig,
) -> dict[str, float]:
    """Normalised sampling weight per source; a source with no kept samples gets 0."""
    quality = source_quality(mean_scores, config.scores)
    raw = {
        s: priors.get(s, 1.0) * n**config.size_exponent * math.exp(config.quality_temperature * quality.get(s, 0.0))
        if n > 0 else 0.0
        for s, n in kept.items()
    }
    total = sum(raw.values())
    return {s: (w / total if total > 0 else 0.0) for s, w in raw.items()}
