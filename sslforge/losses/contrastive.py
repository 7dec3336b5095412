"""NT-Xent (SimCLR's normalised temperature-scaled cross entropy), distributed-aware.

Each rank holds B/N pairs. Logits are this rank's 2b queries against the 2B gathered keys, so
memory grows with the local batch times the global one, not the global batch squared. The
positive of local query i sits at a column offset by `rank * b`; every other key except the
query itself is a negative (2B - 2 of them, as in the paper). Logits, softmax and the gather's
backward are float32 under any autocast (see `precision`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.precision import float32_loss


def check_pairs(name: str, z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    """Argument checks shared by the two-view losses (NT-Xent, DCL, debiased)."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{name}: z1 and z2 must both be (b, d), "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def positive_and_negative_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                                 gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's 2b anchors (all first views, then all second views) against all ranks' keys
    (with `gather`; else this rank's only).

    Returns the positive logit of each anchor (2b,) and its logits against the 2B keys of the
    global batch (2b, 2B) with the anchor itself and its positive at -inf: the 2B - 2 negatives.
    """
    b = z1.shape[0]
    queries = F.normalize(torch.cat([z1, z2]), dim=1)  # (2b, d)
    keys1, keys2 = queries[:b], queries[b:]
    if gather:
        keys1, keys2 = distributed.gather_with_grad(keys1), distributed.gather_with_grad(keys2)
    big_b = keys1.shape[0]
    if big_b < 2:
        raise ValueError(f"contrastive loss: needs at least 2 pairs over all ranks, got {big_b}")
    logits = queries @ torch.cat([keys1, keys2]).T / temperature  # (2b, 2B)

    local = torch.arange(b, device=z1.device) + (distributed.rank() * b if gather else 0)
    self_cols = torch.cat([local, local + big_b])
    positive_cols = torch.cat([local + big_b, local])
    rows = torch.arange(2 * b, device=z1.device)
    positive = logits[rows, positive_cols]
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[rows, self_cols] = True
    excluded[rows, positive_cols] = True
    return positive, logits.masked_fill(excluded, float("-inf"))


@float32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            gather: bool = True) -> torch.Tensor:
    """Mean NT-Xent over this rank's 2b anchors; with `gather`, negatives come from all ranks.

    z1, z2: (b, d) projections of the two views of the same b images (not yet normalised).
    """
    check_pairs("nt_xent", z1, z2, temperature)
    positive, negatives = positive_and_negative_logits(z1, z2, temperature, gather)
    return (torch.logaddexp(positive, torch.logsumexp(negatives, dim=1)) - positive).mean()
