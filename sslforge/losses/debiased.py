"""Debiased contrastive loss (Chuang et al., 2020), SimCLR form, distributed-aware.

A "negative" drawn from the data has the anchor's class with probability tau_plus, so the sum
over the N = 2B - 2 negatives of the global batch over-counts pull-aways from same-class
samples. The paper replaces it by an estimate of the sum over true negatives (one positive,
M = 1, as the official `chingyaoc/DCL` main.py):

    Ng_i = max( (sum_{negatives j} e^{s_ij/T} - tau_plus * N * e^{s_ii'/T}) / (1 - tau_plus),
                N * e^{-1/T} )                        # its value if every s_ij were -1
    L_i  = -log( e^{s_ii'/T} / (e^{s_ii'/T} + Ng_i) )

averaged over the 2B anchors (both views). Where the clamp holds, Ng_i carries no gradient,
as the official `torch.clamp`. With tau_plus = 0, Ng_i is the plain negative sum (it never
falls below the bound, as s_ij >= -1), so e^{s_ii'/T} + Ng_i is NT-Xent's denominator and the
loss is exactly `nt_xent` (official defaults: T = 0.5, tau_plus = 0.1).

Everything is computed in log space, so e^{1/T} never overflows float32, even for small T.
Distributed as `nt_xent`: N counts the global batch, the keys of all ranks are gathered with
gradient, and the mean over this rank's 2b anchors averages over ranks to the global loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslforge.losses.contrastive import check_pairs, positive_and_negative_logits
from sslforge.losses.precision import float32_loss


def _log_true_negatives(positive: torch.Tensor, log_negatives: torch.Tensor, tau_plus: float,
                        n: int) -> torch.Tensor:
    """log of the unclamped estimate (sum - tau_plus * N * e^pos) / (1 - tau_plus), -inf where
    it is <= 0. With q = log(tau_plus * N) + pos - log(sum): log(sum) + log(1 - e^q) - log(1 - tau_plus)."""
    log_prior = math.log(tau_plus * n) if tau_plus > 0 else -math.inf
    q = log_prior + positive - log_negatives
    positive_estimate = q < 0
    safe_q = torch.where(positive_estimate, q, torch.full_like(q, -1.0))  # no NaN in the unused branch
    estimate = log_negatives + torch.log(-torch.expm1(safe_q)) - math.log1p(-tau_plus)
    return torch.where(positive_estimate, estimate, torch.full_like(q, -math.inf))


@float32_loss
def debiased_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                     tau_plus: float = 0.1) -> torch.Tensor:
    """Mean debiased NT-Xent over this rank's 2b anchors; negatives of all ranks.

    z1, z2: (b, d) projections of the two views of the same b images (normalised here).
    tau_plus: class prior, the probability that a random sample shares the anchor's class, in [0, 1).
    """
    check_pairs("debiased_nt_xent", z1, z2, temperature)
    if not 0 <= tau_plus < 1:
        raise ValueError(f"debiased_nt_xent: tau_plus must be in [0, 1), got {tau_plus}")
    positive, negatives = positive_and_negative_logits(z1, z2, temperature)
    n = negatives.shape[1] - 2  # 2B - 2 negatives per anchor
    log_ng = _log_true_negatives(positive, torch.logsumexp(negatives, dim=1), tau_plus, n)
    log_ng = log_ng.clamp(min=math.log(n) - 1 / temperature)
    return F.softplus(log_ng - positive).mean()  # log(1 + Ng / e^pos) = -log(e^pos / (e^pos + Ng))
