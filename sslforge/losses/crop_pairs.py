"""The swapped cross-entropy of multi-crop methods (DINO's distillation, SwAV's swapped
prediction): every target crop against every other crop's prediction."""
from __future__ import annotations

import torch


def cross_entropy_over_crop_pairs(targets: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the pairs (t, v), v != t, of mean_b sum_k -targets[t] log_probs[v].

    targets: (T, b, K) distributions of the first T crops; log_probs: (V, b, K), V >= T, the same
    crops first. Every target crop has the same V - 1 partners, so this is also the mean over t
    of the mean over v. One einsum over (b, K) instead of a loop over pairs.
    """
    cross = -torch.einsum("tbk,vbk->tv", targets, log_probs) / targets.shape[1]
    same_crop = torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
    return cross[~same_crop].mean()
