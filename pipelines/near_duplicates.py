"""Near-duplicate removal by embedding: greedy within clusters, as SemDeDup does at scale.

Samples are visited best first (by a quality score, ties by key); a sample is a near duplicate
when its cosine similarity to a sample already kept reaches the threshold. Comparing each sample
with every kept one costs O(N * kept), so past `cluster_size` samples the embeddings are first
split by k-means into clusters of about that size and the greedy rule runs inside each cluster:
near duplicates lie close together, so they almost always share a cluster (Abbas et al., 2023).

    >>> duplicate_N = near_duplicate_mask(embeddings_ND, quality_N, threshold=0.95)  # True: drop
"""

import numpy as np

BLOCK = 1024  # rows compared with the kept set at a time


def kmeans(x_ND: np.ndarray, k: int, *, iterations: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster index per row of unit vectors `x_ND` (spherical k-means, k-means++ style seeding)."""
    rng = np.random.default_rng(seed)
    n = len(x_ND)
    centres = x_ND[rng.choice(n, size=k, replace=False)]
    labels = np.zeros(n, np.int64)
    for _ in range(iterations):
        labels = np.argmax(x_ND @ centres.T, axis=1)
        for c in range(k):
            members = x_ND[labels == c]
            if len(members):
                centre = members.sum(axis=0)
                centres[c] = centre / max(np.linalg.norm(centre), 1e-12)
    return labels


def _greedy(x_ND: np.ndarray, threshold: float) -> np.ndarray:
    """Rows of `x_ND` (already in visiting order) that duplicate an earlier kept row."""
    n = len(x_ND)
    duplicate = np.zeros(n, bool)
    kept = np.zeros((0, x_ND.shape[1]), x_ND.dtype)
    for start in range(0, n, BLOCK):
        block = x_ND[start : start + BLOCK]
        against_kept = (block @ kept.T).max(axis=1) if len(kept) else np.full(len(block), -np.inf)
        within = block @ block.T
        block_kept: list[int] = []
        for i in range(len(block)):
            if against_kept[i] >= threshold or (block_kept and within[i, block_kept].max() >= threshold):
                duplicate[start + i] = True
            else:
                block_kept.append(i)
        kept = np.concatenate([kept, block[block_kept]])
    return duplicate


def near_duplicate_mask(
    embeddings_ND: np.ndarray,
    quality_N: np.ndarray | None = None,
    *,
    threshold: float,
    cluster_size: int = 50_000,
    seed: int = 0,
) -> np.ndarray:
    """True for every sample that is a near duplicate of a better one.

    Args:
        embeddings_ND: one embedding per sample (normalised here).
        quality_N: higher is better; the best sample of a duplicate group is the one kept. With
            None the first row wins.
        threshold: cosine similarity at or above which two samples are duplicates.
        cluster_size: above this many samples, run the greedy rule inside k-means clusters.
    """
    n = len(embeddings_ND)
    if n == 0:
        return np.zeros(0, bool)
    x_ND = embeddings_ND.astype(np.float32)
    x_ND /= np.maximum(np.linalg.norm(x_ND, axis=1, keepdims=True), 1e-12)
    quality = np.zeros(n) if quality_N is None else np.nan_to_num(quality_N.astype(np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(n), -quality))  # best first, ties by position
    labels = kmeans(x_ND, -(-n // cluster_size), seed=seed) if n > cluster_size else np.zeros(n, np.int64)
    duplicate = np.zeros(n, bool)
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        duplicate[rows] = _greedy(x_ND[rows], threshold)
    return duplicate
