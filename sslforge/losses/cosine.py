"""Negative cosine similarity with a stop-gradient target (SimSiam's D, BYOL's regression).

    D(p, z) = -mean_i cos(p_i, sg(z_i))

Each sample's term uses only its own pair, so the mean over ranks of each rank's mean is the
global mean: no collective is needed. BYOL's normalised MSE, 2 - 2cos, is 2 + 2 * D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge.losses.precision import float32_loss


@float32_loss
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -cos(p, z), with z detached: p (the predictor's output) is
    pulled towards z, z is never pushed (the stop-gradient that prevents collapse)."""
    if p.ndim != 2 or p.shape != z.shape:
        raise ValueError(
            f"negative_cosine: p and z must both be (b, d), got {tuple(p.shape)} and {tuple(z.shape)}")
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()
