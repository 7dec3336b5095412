"""Hard negative mixing (MoCHi, Kalantidis et al., 2020): MoCo's InfoNCE with synthetic negatives.

For query q (normalised) and MoCo's queue, let n_1 .. n_N be the N queue items with the highest
q.n, hardest first. Each query gets its own synthetic negatives, mixed from them:

    type 1 (s of them):  h  = normalize(a n_i + (1 - a) n_j),   a ~ U(0, 1),   i, j ~ U{1..N}
    type 2 (s' of them): h' = normalize(b q + (1 - b) n_j),     b ~ U(0, 0.5), j ~ U{1..N}

and the loss is MoCo's InfoNCE with their logits appended to the queue's:

    L = mean_q -log( e^{q.k/T} / (e^{q.k/T} + sum_queue e^{q.n/T} + sum_{h, h'} e^{q.h/T}) )

The mixtures are constants (q inside h' is detached: only q's own side of q.h' is trained) and
are never enqueued. With s = s' = 0 this is `info_nce` with a queue.

No official code was available to check against; the mixing, its ranges, the detaching and the
picks with replacement among the N hardest follow the paper and the reimplementations
davidsvy/hard-negative-mixing (src/moco.py) and giakoumoglou/synco (synco/builder.py).

Every random draw is per query and comes from a generator the caller seeds identically on every
rank, drawn for the global batch and sliced (`shared_random`), so N ranks with b queries each
give the loss and gradients of one rank with B = N*b. The draws, in this order, each a (B, s) or
(B, s') table of uniforms u (skipped when the count is 0): i, j, a for type 1, then j and
b = 0.5 u for type 2; an index is floor(u * N), counted among the N hardest in decreasing q.n.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge.losses.precision import float32_loss
from sslforge.losses.shared_random import shared_randint, shared_uniforms

QUERY_MIX_MAX = 0.5  # type-2 weight of the query: b ~ U(0, 0.5), the paper's range


def _check(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, num_hard: int,
           num_mix: int, num_mix_query: int, generator: torch.Generator | None) -> None:
    name = "mochi_info_nce"
    if q.ndim != 2 or q.shape != k.shape or len(q) == 0:
        raise ValueError(f"{name}: q and k must both be (b, d) with b >= 1, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue is None or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"{name}: queue must be (K, {q.shape[1]}), got "
                         f"{None if queue is None else tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    if not 1 <= num_hard <= len(queue):
        raise ValueError(f"{name}: num_hard must lie in [1, K={len(queue)}] (the queue's size), got {num_hard}")
    if num_mix < 0 or num_mix_query < 0:
        raise ValueError(f"{name}: num_mix and num_mix_query must be >= 0, got {num_mix} and {num_mix_query}")
    if generator is None and num_mix + num_mix_query > 0:
        raise ValueError(f"{name}: a generator (seeded alike on every rank) is needed to mix negatives")


def _pick(hardest: torch.Tensor, queue: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """(b, count, d): queue items drawn with replacement among each query's `hardest` (b, N) ids."""
    picks = shared_randint(len(hardest), count, hardest.shape[1], generator, hardest.device)
    return queue[hardest.gather(1, picks)]


def _weights(rows: int, count: int, scale: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(rows, count, 1) mixing weights ~ U(0, scale)."""
    return (scale * shared_uniforms(rows, count, generator, device)).unsqueeze(2)


@torch.no_grad()
def _synthetic_negatives(q: torch.Tensor, queue: torch.Tensor, num_hard: int, num_mix: int, num_mix_query: int,
                         generator: torch.Generator | None) -> torch.Tensor:
    """(b, num_mix + num_mix_query, d) normalised mixtures for the normalised queries `q`."""
    mixed = [q.new_zeros(len(q), 0, q.shape[1])]
    if num_mix + num_mix_query == 0:
        return mixed[0]
    hardest = (q @ queue.T).topk(num_hard, dim=1, sorted=True).indices  # (b, N), hardest first
    if num_mix:
        first, second = _pick(hardest, queue, num_mix, generator), _pick(hardest, queue, num_mix, generator)
        a = _weights(len(q), num_mix, 1.0, generator, q.device)
        mixed.append(F.normalize(a * first + (1 - a) * second, dim=2))
    if num_mix_query:
        other = _pick(hardest, queue, num_mix_query, generator)
        b = _weights(len(q), num_mix_query, QUERY_MIX_MAX, generator, q.device)
        mixed.append(F.normalize(b * q.unsqueeze(1) + (1 - b) * other, dim=2))
    return torch.cat(mixed, dim=1)


@float32_loss
def mochi_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, num_hard: int,
                   num_mix: int, num_mix_query: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean MoCHi InfoNCE over this rank's b queries (see the module docstring).

    q: (b, d) queries (gradient flows); k: (b, d) keys of the same images (detached); both
    L2-normalised here. queue: (K, d) MoCo's already-normalised keys, the same on every rank.
    num_hard: N, the hardest queue items to mix from (1 <= N <= K); num_mix: s type-1 and
    num_mix_query: s' type-2 negatives per query (the paper's MoCHi(N, s, s'));
    generator: seeded identically on every rank (None only when s = s' = 0).
    """
    _check(q, k, queue, temperature, num_hard, num_mix, num_mix_query, generator)
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = queue.detach()
    synthetic = _synthetic_negatives(q.detach(), queue, num_hard, num_mix, num_mix_query, generator)
    positive = (q * k).sum(dim=1, keepdim=True)  # (b, 1)
    negative = q @ queue.T  # (b, K)
    mixed = (q.unsqueeze(1) * synthetic).sum(dim=2)  # (b, s + s')
    logits = torch.cat([positive, negative, mixed], dim=1) / temperature
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)
