"""SwAV's Sinkhorn-Knopp codes and swapped-prediction loss.

References written out here: a transcription of facebookresearch/swav main_swav.py's
`distributed_sinkhorn` (exp domain, float64, one process holding every row), the transport
polytope the paper projects onto (each sample's code sums to 1, each prototype receives B/K of
the mass over every rank's rows), and the official loss loop (for i in crops_for_assign, for
v != i: -mean(sum(q_i * log_softmax(p_v / T)))).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses import sinkhorn, swav_loss
from tests.dist_harness import run_ranks

B, K, D, QUEUE = 64, 24, 8, 32  # batch rows, prototypes, embedding width, queue rows (all ranks)


def _scores(rows: int, seed: int = 0, k: int = K) -> torch.Tensor:
    """Scores of unit embeddings against unit prototypes, as SwAV's (in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(rows, D, generator=g), dim=1)
    c = F.normalize(torch.randn(k, D, generator=g), dim=1)
    return z @ c.T


def _official(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """main_swav.py's distributed_sinkhorn on one process (world size 1), in `dtype`."""
    q = torch.exp(scores.to(dtype) / epsilon).t()  # K x B
    batch, prototypes = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= prototypes
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


# ------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_matches_official_transcription(iterations: int) -> None:
    scores = _scores(B)
    expected = _official(scores, iterations=iterations)
    got = sinkhorn(scores, 0.05, iterations)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)


def test_codes_are_on_the_transport_polytope() -> None:
    """Each sample's code sums to 1; iterated to convergence, each prototype gets B/K."""
    scores = _scores(B)
    codes = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(codes.sum(dim=1), torch.ones(B), atol=1e-5)
    converged = sinkhorn(scores, 0.05, 300)
    assert torch.allclose(converged.sum(dim=0), torch.full((K,), B / K), rtol=1e-3)
    # three iterations already spread the mass far more evenly than the plain softmax
    softmax_mass = F.softmax(scores / 0.05, dim=1).sum(dim=0)
    assert codes.sum(dim=0).std() < 0.6 * softmax_mass.std()  # 0.80 vs 1.66 here


@pytest.mark.parametrize("spread", ["signs", "normal"])
def test_huge_scores_give_finite_codes(spread: str) -> None:
    """|s| = 1e4 (features that are not unit-norm): exp(s / 0.05) overflows float32, where the
    official code returns NaN; the log domain gives finite codes that still sum to 1."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(B, K, generator=g)
    scores = 1e4 * (raw.sign() if spread == "signs" else raw)
    assert not torch.isfinite(_official(scores, dtype=torch.float32)).all()  # what the log domain avoids
    codes = sinkhorn(scores)
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    assert torch.allclose(codes.sum(dim=1), torch.ones(B), atol=1e-5)


def test_bf16_input_computes_in_float32() -> None:
    scores = _scores(B).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores)
    assert codes.dtype == torch.float32
    assert torch.allclose(codes.double(), _official(scores.float()), atol=1e-6, rtol=0)


def test_no_gradient_and_bad_input() -> None:
    scores = _scores(B).requires_grad_()
    assert not sinkhorn(scores).requires_grad
    with pytest.raises(ValueError, match="scores must be"):
        sinkhorn(torch.ones(K))
    with pytest.raises(ValueError, match="epsilon > 0"):
        sinkhorn(_scores(B), epsilon=0.0)


# ----------------------------------------------------------------------- 2 ranks == 1 process
def _rank_codes() -> dict[str, torch.Tensor]:
    """This rank's codes for its half of the batch: plain, with its share of a queue in front
    (rows [r L/W, (r+1) L/W), the queue's rows counting in B), and from bf16 scores."""
    r, w = distributed.rank(), distributed.world_size()
    b, share = B // w, QUEUE // w
    batch, queue = _scores(B), _scores(QUEUE, seed=1)
    mine = batch[r * b:(r + 1) * b]
    with_queue = torch.cat([queue[r * share:(r + 1) * share], mine])
    return {"plain": sinkhorn(mine), "queue": sinkhorn(with_queue)[-b:],
            "bf16": sinkhorn(mine.bfloat16()), "converged": sinkhorn(mine, 0.05, 300)}


def test_two_ranks_equal_one_process() -> None:
    halves = run_ranks(_rank_codes, 2)
    got = {key: torch.cat([h[key] for h in halves]) for key in halves[0]}
    batch, queue = _scores(B), _scores(QUEUE, seed=1)
    expected = {"plain": sinkhorn(batch), "queue": sinkhorn(torch.cat([queue, batch]))[-B:],
                "bf16": sinkhorn(batch.bfloat16()), "converged": sinkhorn(batch, 0.05, 300)}
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-6, rtol=0), key
    # and the official transcription over all rows (queue rows count in B)
    assert torch.allclose(got["plain"].double(), _official(batch), atol=1e-6, rtol=0)
    assert torch.allclose(got["queue"].double(), _official(torch.cat([queue, batch]))[-B:], atol=1e-6, rtol=0)
    assert torch.allclose(got["converged"].sum(dim=0), torch.full((K,), B / K), rtol=1e-3)
    assert not torch.allclose(got["queue"], got["plain"], atol=1e-3)  # the queue changes the codes


# ---------------------------------------------------------------------------------- the loss
def _official_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """main_swav.py's loop over crops_for_assign and the other crops."""
    loss = torch.zeros(())
    for i, q in enumerate(codes):
        subloss = torch.zeros(())
        for v in [v for v in range(len(scores)) if v != i]:
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(scores[v] / temperature, dim=1), dim=1))
        loss = loss + subloss / (len(scores) - 1)
    return loss / len(codes)


def test_swav_loss_matches_official_loop() -> None:
    g = torch.Generator().manual_seed(2)
    scores = [torch.randn(B, K, generator=g).requires_grad_() for _ in range(5)]  # 2 global + 3 local
    codes = [sinkhorn(s.detach()) for s in scores[:2]]
    got = swav_loss(scores, codes, 0.1)
    expected = _official_loss([s.detach() for s in scores], codes, 0.1)
    assert torch.allclose(got, expected, atol=1e-5)
    got.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    with pytest.raises(ValueError, match="more crops than coded"):
        swav_loss(scores[:2], codes, 0.1)


def test_swav_loss_bf16_autocast_is_float32() -> None:
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(B, K, generator=g) for _ in range(3)]
    codes = [sinkhorn(s) for s in scores[:2]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = swav_loss([s.bfloat16() for s in scores], codes, 0.1)
    assert loss.dtype == torch.float32
    expected = _official_loss([s.bfloat16().float() for s in scores], codes, 0.1)
    assert torch.allclose(loss, expected, atol=1e-5)
