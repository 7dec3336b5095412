"""NT-Xent: the paper's definition, and 2 ranks x B/2 == 1 rank x B for loss and gradients."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses import float32_loss, nt_xent
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


def _nt_xent_grad(z1: torch.Tensor, z2: torch.Tensor, bf16: bool, loss=nt_xent) -> torch.Tensor:
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        value = loss(a, b, 0.1)
    value.backward()  # outside autocast, as DeepSpeed's engine and torch's AMP recipe do
    return torch.cat([a.grad, b.grad])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _large_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 256 at T=0.1, where bf16 logits were measured 2% off in the gradient."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(256, 128, generator=g)
    return z1, z1 + 0.5 * torch.randn(256, 128, generator=g)


def test_bf16_autocast_gradient_equals_fp32() -> None:
    """Logits, softmax and cross-entropy run in fp32 under autocast: the gradient may differ from
    the fp32 one by fp32 rounding only (~1e-7), far below 1e-5; one bf16 op anywhere in the
    logits (8-bit mantissa, 0.4% per logit, amplified by 1/T) costs ~1e-2."""
    z1, z2 = _large_pairs()
    assert _relative(_nt_xent_grad(z1, z2, bf16=True), _nt_xent_grad(z1, z2, bf16=False)) <= 1e-5


def test_bf16_logits_would_be_seen() -> None:
    """Guard for the test above: the same loss without its fp32 region (autocast redoes the
    logits' matmul in bf16 even from float32 inputs) is 2% off."""
    z1, z2 = _large_pairs()
    bf16 = _nt_xent_grad(z1, z2, bf16=True, loss=nt_xent.__wrapped__)
    assert _relative(bf16, _nt_xent_grad(z1, z2, bf16=False)) > 5e-3


def test_float32_loss_region() -> None:
    """Autocast off inside, floating inputs (nested too, as multi-crop losses take them) in fp32,
    integer inputs untouched, float32 result."""
    seen = {}

    @float32_loss
    def loss(crops: list[torch.Tensor], target: torch.Tensor, extra: dict) -> torch.Tensor:
        seen.update(autocast=torch.is_autocast_enabled("cpu"), dtypes={c.dtype for c in crops},
                    target=target.dtype, extra=extra["w"].dtype)
        return (crops[0] @ crops[1].T).sum() + extra["w"].sum()

    crops = [torch.randn(4, 8, dtype=torch.bfloat16) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(crops, torch.arange(4), extra={"w": torch.ones(2, dtype=torch.bfloat16)})
        assert torch.is_autocast_enabled("cpu")  # restored on the way out
    assert seen == {"autocast": False, "dtypes": {torch.float32}, "target": torch.int64,
                    "extra": torch.float32}
    assert out.dtype == torch.float32
