"""NT-Xent: the paper's definition, and 2 ranks x B/2 == 1 rank x B for loss and gradients."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses import nt_xent
from tests.dist_harness import run_ranks

B, D, TAU = 8, 16, 0.2


def _pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Literal per-anchor formula: -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + n // 2) % n
        sims = torch.stack([z[i] @ z[k] for k in range(n) if k != i]) / tau
        total = total - (z[i] @ z[j] / tau - torch.logsumexp(sims, 0))
    return total / n


def test_matches_paper_definition() -> None:
    z1, z2 = _pairs()
    assert torch.allclose(nt_xent(z1, z2, TAU), _reference_nt_xent(z1, z2, TAU), atol=1e-5)


def test_perfect_alignment_beats_random() -> None:
    z1, _ = _pairs()
    aligned = nt_xent(z1, z1.clone(), TAU)
    shuffled = nt_xent(z1, z1[torch.randperm(B)], TAU)
    assert aligned < shuffled
    assert aligned >= 0 and math.isfinite(aligned.item())


def _loss_and_grads(world: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    z1_all, z2_all = _pairs()
    b = B // world
    r = distributed.rank()
    z1 = z1_all[r * b:(r + 1) * b].clone().requires_grad_()
    z2 = z2_all[r * b:(r + 1) * b].clone().requires_grad_()
    loss = nt_xent(z1, z2, TAU)
    loss.backward()
    # DDP averages parameter gradients over ranks; the embedding gradient scales the same way.
    return loss.item(), z1.grad / world, z2.grad / world


def test_two_ranks_equal_one_rank() -> None:
    (single,) = run_ranks(_loss_and_grads, 1, 1)
    halves = run_ranks(_loss_and_grads, 2, 2)
    loss_2 = sum(h[0] for h in halves) / 2
    assert abs(loss_2 - single[0]) < 1e-5
    assert torch.allclose(torch.cat([h[1] for h in halves]), single[1], atol=1e-5)
    assert torch.allclose(torch.cat([h[2] for h in halves]), single[2], atol=1e-5)


def test_without_gather_gradients_differ() -> None:
    """Guard for the test above: local-only negatives really give a different loss."""
    z1, z2 = _pairs()
    full = nt_xent(z1, z2, TAU, gather=False)
    halves = (nt_xent(z1[:4], z2[:4], TAU, gather=False) + nt_xent(z1[4:], z2[4:], TAU, gather=False)) / 2
    assert abs(full.item() - halves.item()) > 1e-3
