"""InfoNCE with momentum keys (MoCo), distributed-aware.

Keys come from a momentum encoder and are targets, never trained through: the loss detaches
them. Two sources of negatives:

- a queue (MoCo v2): logits [q.k+, q.queue^T] / T, the positive at column 0. The queue holds
  normalised keys of earlier steps (of all ranks) and is a constant here; the method enqueues.
- no queue (MoCo v3): the keys of every rank, gathered without gradient as the official
  `concat_all_gather`; query i of rank r finds its positive at column `r * b + i`.

Either way the result is the mean over this rank's b queries, so the mean over ranks (what the
trainer's gradient averaging optimises) is the loss of the global batch. MoCo v3's 2*tau factor
and its symmetrisation belong to the method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.precision import float32_loss


def _check_shapes(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None) -> None:
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"info_nce: q and k must both be (b, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"info_nce: queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")


@float32_loss
def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float,
             queue: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each query against its key among the negatives.

    q: (b, d) queries (gradient flows); k: (b, d) keys of the same images (detached);
    both L2-normalised here. queue: (K, d) already-normalised keys, or None for the keys of
    all ranks. keep: optional (b, K) mask over the queue (HCSC's instance selection): a dropped
    negative's logit is multiplied by 0, so it still adds e^0 to the denominator, as published.
    """
    _check_shapes(q, k, queue)
    if keep is not None and (queue is None or keep.shape != (len(q), len(queue))):
        raise ValueError(f"info_nce: keep must be a (b, K) mask over a queue, got "
                         f"{None if keep is None else tuple(keep.shape)} with queue "
                         f"{None if queue is None else tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    if queue is not None:
        positive = (q * k).sum(dim=1, keepdim=True)  # (b, 1)
        negative = q @ queue.detach().T  # (b, K)
        if keep is not None:
            negative = negative * keep.to(negative)
        logits = torch.cat([positive, negative], dim=1) / temperature
        labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    else:
        keys = distributed.all_gather(k)  # (B, d), every rank's keys, rank order
        logits = q @ keys.T / temperature  # (b, B)
        labels = torch.arange(len(q), device=q.device) + distributed.rank() * len(q)
    return F.cross_entropy(logits, labels)
