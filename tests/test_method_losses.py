"""The momentum and teacher methods' losses against their published formulas written out by hand,
2 ranks x B/2 == 1 rank x B, and float32 compute under bf16 autocast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sslforge.losses import dino_center, dino_loss, info_nce, negative_cosine
from tests.dist_harness import run_ranks

B, D, K = 8, 6, 5
N_GLOBAL, N_LOCAL = 2, 3
TAU, STUDENT_T, TEACHER_T, CENTER_M = 0.2, 0.1, 0.04, 0.9


# --- InfoNCE ---------------------------------------------------------------------------------

def _reference_info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                              tau: float) -> torch.Tensor:
    """MoCo's loss query by query, scalar by scalar:
    -log e^{q.k/T} / (e^{q.k/T} + sum_j e^{q.n_j/T})."""
    total = 0.0
    for qi, ki in zip(q, k):
        qi, ki = qi / qi.norm(), ki / ki.norm()
        pos = sum(qi[c] * ki[c] for c in range(len(qi))) / tau
        negs = [sum(qi[c] * n[c] for c in range(len(qi))) / tau for n in queue]
        total = total - (pos - torch.log(torch.exp(pos) + sum(torch.exp(x) for x in negs)))
    return total / len(q)


def test_info_nce_queue_hand_example() -> None:
    """q, k unnormalised (normalised inside), queue rows are unit keys; T = 0.5. The positive's
    logit is in column 0; the queue and the key receive no gradient."""
    q = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)  # -> (0.6, 0.8), (1, 0)
    k = torch.tensor([[0.0, 2.0], [1.0, 1.0]], requires_grad=True)  # -> (0, 1), (0.707, 0.707)
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]], requires_grad=True)
    # Logits by hand, /0.5: row 0: pos 0.8 -> 1.6, negs (0.6, 0.8, 0.28) -> (1.2, 1.6, 0.56);
    # row 1: pos 0.7071 -> 1.4142, negs (1, 0, -0.6) -> (2, 0, -1.2).
    by_hand = [(1.6, [1.6, 1.2, 1.6, 0.56]), (2 * math.sqrt(0.5), [2 * math.sqrt(0.5), 2.0, 0.0, -1.2])]
    expected = sum(-pos + math.log(sum(math.exp(x) for x in row)) for pos, row in by_hand) / 2

    loss = info_nce(q, k, 0.5, queue=queue)
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert k.grad is None and queue.grad is None

    q_ref = q.detach().clone().requires_grad_()
    reference = _reference_info_nce_queue(q_ref, k.detach(), queue.detach(), 0.5)
    reference.backward()
    assert reference.item() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(q.grad, q_ref.grad, atol=1e-6)


def test_info_nce_rejects_bad_shapes() -> None:
    q = torch.randn(4, D)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, torch.randn(3, D), TAU)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, torch.randn(4, D), TAU, queue=torch.randn(16, D + 1))


# --- negative cosine -------------------------------------------------------------------------

def test_negative_cosine_value_and_stop_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, D, generator=g, requires_grad=True)
    z = torch.randn(4, D, generator=g, requires_grad=True)
    pn, zn = p.detach().numpy(), z.detach().numpy()
    norms_p, norms_z = np.linalg.norm(pn, axis=1), np.linalg.norm(zn, axis=1)
    cos = (pn * zn).sum(1) / (norms_p * norms_z)
    # d(-cos_i)/dp_i = -(z_i / (|p_i||z_i|) - cos_i p_i / |p_i|^2), divided by b for the mean.
    grad_p = -(zn / (norms_p * norms_z)[:, None] - cos[:, None] * pn / (norms_p ** 2)[:, None]) / len(pn)

    loss = negative_cosine(p, z)
    loss.backward()
    assert loss.item() == pytest.approx(-cos.mean(), abs=1e-6)
    assert np.allclose(p.grad.numpy(), grad_p, atol=1e-6)
    assert z.grad is None


# --- DINO ------------------------------------------------------------------------------------

def _crops(seed: int = 2, b: int = B) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, K, generator=g) for _ in range(N_GLOBAL + N_LOCAL)]
    teacher = [torch.randn(b, K, generator=g) for _ in range(N_GLOBAL)]
    return student, teacher, 0.3 * torch.randn(1, K, generator=g)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor) -> float:
    """DINOLoss.forward's double loop, per sample, in float64 numpy."""
    s = [x.detach().double().numpy() for x in student]
    t = [x.detach().double().numpy() for x in teacher]
    c = center.double().numpy()[0]
    total, terms = 0.0, 0
    for iq in range(len(t)):
        for v in range(len(s)):
            if v == iq:
                continue
            per_sample = []
            for i in range(len(s[v])):
                q = _np_softmax((t[iq][i] - c) / TEACHER_T)
                log_p = np.log(_np_softmax(s[v][i] / STUDENT_T))
                per_sample.append(-(q * log_p).sum())
            total += np.mean(per_sample)
            terms += 1
    return total / terms


def test_dino_loss_matches_double_loop() -> None:
    student, teacher, center = _crops()
    student = [x.requires_grad_() for x in student]
    teacher = [x.requires_grad_() for x in teacher]
    loss = dino_loss(student, teacher, center, STUDENT_T, TEACHER_T)
    loss.backward()
    assert loss.item() == pytest.approx(_reference_dino(student, teacher, center), abs=1e-5)
    assert all(t.grad is None for t in teacher)  # the teacher is a target
    assert all(s.grad is not None for s in student)


def test_dino_loss_rejects_bad_crops() -> None:
    student, teacher, center = _crops()
    with pytest.raises(ValueError, match="teacher crop"):
        dino_loss(student[:1], teacher, center, STUDENT_T, TEACHER_T)
    with pytest.raises(ValueError, match="same"):
        dino_loss([*student, torch.randn(B, K + 1)], teacher, center, STUDENT_T, TEACHER_T)
    with pytest.raises(ValueError, match="center"):
        dino_loss(student, teacher, torch.zeros(1, K + 1), STUDENT_T, TEACHER_T)


def test_dino_center_formula() -> None:
    _, teacher, center = _crops()
    teacher = [t.requires_grad_() for t in teacher]
    rows = np.concatenate([t.detach().numpy() for t in teacher])
    expected = CENTER_M * center.numpy() + (1 - CENTER_M) * rows.mean(axis=0, keepdims=True)
    new = dino_center(teacher, center, CENTER_M)
    assert new.shape == (1, K) and not new.requires_grad
    assert np.allclose(new.numpy(), expected, atol=1e-6)


# --- 2 ranks x B/2 == 1 rank x B ------------------------------------------------------------

def _rank_results(world: int) -> dict[str, object]:
    """This rank's slice of one global batch through each distributed-aware loss. Gradients are
    divided by the world size, as the trainer's averaging of parameter gradients over ranks does:
    with keys and teachers detached, a sample's gradient comes only from its own rank's loss."""
    from sslforge import distributed

    r = distributed.rank()
    b = B // world
    rows = slice(r * b, (r + 1) * b)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, D, generator=g)[rows].clone().requires_grad_()
    k = torch.randn(B, D, generator=g)[rows].clone()
    moco = info_nce(q, k, TAU)
    moco.backward()

    student, teacher, center = _crops()
    student = [s[rows].clone().requires_grad_() for s in student]
    teacher = [t[rows] for t in teacher]
    dino = dino_loss(student, teacher, center, STUDENT_T, TEACHER_T)
    dino.backward()
    return {"info_nce": moco.item(), "q_grad": q.grad / world,
            "dino": dino.item(), "student_grads": [s.grad / world for s in student],
            "center": dino_center(teacher, center, CENTER_M)}


def test_two_ranks_equal_one_rank() -> None:
    single = _rank_results(1)  # no process group here: the single-process path
    halves = run_ranks(_rank_results, 2, 2)
    assert sum(h["info_nce"] for h in halves) / 2 == pytest.approx(single["info_nce"], abs=1e-5)
    assert torch.allclose(torch.cat([h["q_grad"] for h in halves]), single["q_grad"], atol=1e-6)
    assert sum(h["dino"] for h in halves) / 2 == pytest.approx(single["dino"], abs=1e-5)
    for crop, grad in enumerate(single["student_grads"]):
        assert torch.allclose(torch.cat([h["student_grads"][crop] for h in halves]), grad, atol=1e-6)
    for h in halves:
        assert torch.allclose(h["center"], single["center"], atol=1e-6)


def test_info_nce_without_gather_would_differ() -> None:
    """Guard for the test above: each half seeing only its own keys gives another loss."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    halves = (info_nce(q[:B // 2], k[:B // 2], TAU) + info_nce(q[B // 2:], k[B // 2:], TAU)) / 2
    assert abs(halves.item() - info_nce(q, k, TAU).item()) > 1e-3


# --- float32 under bf16 autocast -------------------------------------------------------------

def _large(seed: int, *shape: int) -> torch.Tensor:
    """Logits far beyond exp's float32 range once divided by the temperatures."""
    return (1e3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).bfloat16()


def _unit_queue() -> torch.Tensor:
    return torch.nn.functional.normalize(_large(2, 16, D).float(), dim=1).bfloat16()


CASES = {  # name: (loss, its bf16 arguments)
    "info_nce_queue": lambda: (info_nce, (_large(0, 4, D), _large(1, 4, D), 1e-3, _unit_queue())),
    "info_nce_gathered": lambda: (info_nce, (_large(0, 4, D), _large(1, 4, D), 1e-3)),
    "negative_cosine": lambda: (negative_cosine, (_large(0, 4, D), _large(1, 4, D))),
    "dino_loss": lambda: (dino_loss, ([_large(i, 4, K) for i in range(4)], [_large(i, 4, K) for i in range(2)],
                                      _large(9, 1, K), STUDENT_T, TEACHER_T)),
    "dino_center": lambda: (dino_center, ([_large(i, 4, K) for i in range(2)], _large(9, 1, K), CENTER_M)),
}


def _as_float(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_as_float(v) for v in value]
    return value.float() if torch.is_tensor(value) else value


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_under_bf16_autocast(case: str) -> None:
    """bf16 inputs under bf16 autocast: a finite float32 result equal to the float32 computation
    on the same (bf16-rounded) values. Without the float32 region each of these is 5e-4 to 4e-3
    off (measured), far above the tolerance."""
    fn, args = CASES[case]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*args)
    reference = fn(*_as_float(args))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out, reference, rtol=1e-6, atol=0)
