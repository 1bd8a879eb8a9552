"""CLIP score: how well two embeddings of paired samples agree, for any pair of embedders (CLIP
image-text, CLAP audio-text)."""

import torch
import torch.nn.functional as F


def clip_score(a_BD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    """100 * max(cos(a_i, b_i), 0) for each row pair: (B,).

    The per-pair definition torchmetrics' CLIPScore documents (weight w = 100). Embeddings need not
    be unit vectors. torchmetrics' metric clamps the mean of the raw scores instead, so the mean of
    these scores is the same number unless some pair has a negative cosine.

    Example:
        >>> clip_score(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-1.0, 1.0]]))
        tensor([100.,   0.])
    """
    if a_BD.ndim != 2 or a_BD.shape != b_BD.shape:
        raise ValueError(
            f"expected two (batch, dim) embeddings of one shape, got {tuple(a_BD.shape)} "
            f"and {tuple(b_BD.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(a_BD.dtype, b_BD.dtype), torch.float32)
    cosine_B = F.cosine_similarity(a_BD.to(dtype), b_BD.to(dtype), dim=-1)
    return 100 * cosine_B.clamp(min=0)
