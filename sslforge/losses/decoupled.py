"""Decoupled contrastive learning (Yeh et al., 2022: DCL and DCLW), distributed-aware.

NT-Xent's denominator holds the positive pair, which couples the gradient of the negatives to
how well the positive is already matched (small batches suffer most). DCL drops it:

    L_i = -w_i * z_i.z_i' / T + log sum_{j != i, l in {1, 2}} exp(z_i . z_j^(l) / T)

over the 2B - 2 negatives of the global batch (Eq. 6 of the paper: one log-sum-exp over both
views' negatives), symmetrised: 0.5 * (L(z1, z2) + L(z2, z1)). w_i = 1 is DCL; DCLW weighs the
positive by the negative von Mises-Fisher weight w_i = 2 - B * softmax_i(z_i . z_i' / sigma),
so pairs that are already close pull less (sigma 0.5; mean weight 1; no gradient).

Distributed: as `nt_xent`, this rank's 2b anchors against the 2B keys of all ranks, gathered
with gradient; the result is the mean over this rank's anchors, so the mean over ranks is the
global loss. The DCLW softmax runs over the B pairs of all ranks (its normaliser is a batch mean),
so the weights do not depend on how the batch is split.

Differences from lightly's `DCLLoss` / `DCLWLoss` (lightly/loss/dcl_loss.py): lightly computes
the weights over each rank's b pairs only, and takes two log-sum-exps (same-view and other-view
negatives) and adds them, where the paper has one over both (lightly PR #1826 proposes the fix).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.contrastive import check_pairs, positive_and_negative_logits
from sslforge.losses.precision import float32_loss


@torch.no_grad()
def von_mises_fisher_weights(z1: torch.Tensor, z2: torch.Tensor, sigma: float) -> torch.Tensor:
    """DCLW's w_i = 2 - B * softmax_i(z_i . z_i' / sigma) for this rank's b pairs, the softmax
    taken over the B pairs of all ranks. No gradient (a weight, not a target)."""
    similarity = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(dim=1) / sigma  # (b,)
    every_rank = distributed.all_gather(similarity.to(distributed.comm_device())).to(z1.device)
    start = distributed.rank() * len(z1)
    weights = 2 - len(every_rank) * torch.softmax(every_rank, dim=0)
    return weights[start:start + len(z1)]


@float32_loss
def dcl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, weighted: bool = False,
             sigma: float = 0.5) -> torch.Tensor:
    """Mean DCL (or, with `weighted`, DCLW) over this rank's 2b anchors, negatives of all ranks.

    z1, z2: (b, d) projections of the two views of the same b images (normalised here).
    sigma: DCLW's weight temperature (used only when `weighted`).
    """
    check_pairs("dcl_loss", z1, z2, temperature)
    if weighted and sigma <= 0:
        raise ValueError(f"dcl_loss: sigma must be > 0, got {sigma}")
    positive, negatives = positive_and_negative_logits(z1, z2, temperature)
    if weighted:
        positive = positive * von_mises_fisher_weights(z1, z2, sigma).repeat(2)
    return (torch.logsumexp(negatives, dim=1) - positive).mean()
