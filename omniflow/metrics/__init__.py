"""Metrics for evaluating generated samples, no Ray: the Fréchet distance over feature vectors (FID
with Inception features), COCO's caption metrics, and the CLIP score of paired embeddings.

    >>> import numpy as np, torch
    >>> from omniflow.metrics import FrechetDistance, caption_metrics, clip_score
    >>> rng = np.random.default_rng(0)
    >>> fd = FrechetDistance(num_features=8)
    >>> fd.add(rng.normal(size=(256, 8)), real=True)
    >>> fd.add(rng.normal(loc=1.0, size=(256, 8)), real=False)
    >>> 7.0 < fd.compute() < 9.5        # ||mu_r - mu_g||^2 = 8, plus sampling error
    True
    >>> caption_metrics(["a red circle"], [["a red circle"]]).summary()["ROUGE-L"]
    1.0
    >>> clip_score(torch.ones(1, 4), torch.ones(1, 4))
    tensor([100.])
"""

from omniflow.metrics.captions import CaptionScores, caption_metrics, tokenize_caption
from omniflow.metrics.frechet import (
    FrechetDistance,
    inception_features,
    load_statistics,
    save_statistics,
)
from omniflow.metrics.similarity import clip_score

__all__ = [
    "CaptionScores",
    "FrechetDistance",
    "caption_metrics",
    "clip_score",
    "inception_features",
    "load_statistics",
    "save_statistics",
    "tokenize_caption",
]
