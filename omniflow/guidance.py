"""Guidance rules as pure functions over velocity predictions."""

from collections.abc import Mapping

import torch


def classifier_free_guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_u + scale * (v_c - v_u). scale = 1 returns the conditional prediction."""
    return v_uncond + scale * (v_cond - v_uncond)


def multimodal_guidance(
    v_all: torch.Tensor,
    v_none: torch.Tensor,
    v_only: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
) -> torch.Tensor:
    """OmniFlow's guidance with one weight alpha_j per conditioning modality j:

        v = v(x | all) + sum_j (alpha_j - 1) * (v(x | j only) - v(x | none))

    With a single condition j, v(x | j only) = v(x | all) and the rule reduces to classifier-free
    guidance v_u + alpha_j (v_c - v_u). A modality missing from `weights` has alpha = 1.
    """
    v = v_all
    for modality, alpha in weights.items():
        if alpha != 1.0:
            v = v + (alpha - 1.0) * (v_only[modality] - v_none)
    return v
