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


@float32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            gather: bool = True) -> torch.Tensor:
    """Mean NT-Xent over this rank's 2b anchors; with `gather`, negatives come from all ranks.

    z1, z2: (b, d) projections of the two views of the same b images (not yet normalised).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"nt_xent: views differ in shape {tuple(z1.shape)} vs {tuple(z2.shape)}")
    b = z1.shape[0]
    queries = F.normalize(torch.cat([z1, z2]), dim=1)  # (2b, d)
    keys1, keys2 = queries[:b], queries[b:]
    if gather:
        keys1, keys2 = distributed.gather_with_grad(keys1), distributed.gather_with_grad(keys2)
    keys = torch.cat([keys1, keys2])  # (2B, d): all first views, then all second views
    big_b = keys1.shape[0]
    offset = distributed.rank() * b if gather else 0

    logits = queries @ keys.T / temperature  # (2b, 2B)
    local = torch.arange(b, device=z1.device) + offset
    self_cols = torch.cat([local, local + big_b])
    positive_cols = torch.cat([local + big_b, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, self_cols] = float("-inf")
    return F.cross_entropy(logits, positive_cols)
