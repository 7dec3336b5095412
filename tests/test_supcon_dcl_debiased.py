"""SupCon, DCL/DCLW and debiased NT-Xent: each against a per-anchor float64 loop written from the
papers' formulas (values and input gradients), their published reductions, and 2 ranks x B/2 ==
1 rank x B with labels and weights from both ranks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses import dcl_loss, debiased_nt_xent, nt_xent, supcon_loss
from sslforge.losses.decoupled import von_mises_fisher_weights
from tests.dist_harness import run_ranks

B, D = 8, 16
# Labels 0 and 1 sit once on each rank's half: with one view, their only positives are remote.
# 2..5 are singletons: no positive at all with one view.
CROSS_RANK_LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5])


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    z1 = _randn(B, D, seed=seed)
    return z1, z1 + 0.8 * _randn(B, D, seed=seed + 100)


def _half_aligned_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs 0, 2, 4, 6 identical (at tau_plus 0.1 some estimates fall under the bound), the rest not."""
    z1, z2 = _pairs(3)
    z2[::2] = z1[::2]
    return z1, z2


def _grads(loss_fn, *inputs: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.item(), [x.grad for x in leaves]


# ----- independent references: one anchor at a time, float64, exp/log only -----

def _ref_supcon(features: torch.Tensor, labels: torch.Tensor, t: float, t_base: float) -> torch.Tensor:
    b, v, _ = features.shape
    z = F.normalize(features.double(), dim=2)
    items = [(i, k) for i in range(b) for k in range(v)]
    total = 0.0
    for i, k in items:
        anchor = z[i, k]
        others = [(j, m) for j, m in items if (j, m) != (i, k)]
        denominator = sum(torch.exp(anchor @ z[j, m] / t) for j, m in others)
        positives = [(j, m) for j, m in others if labels[j] == labels[i]]
        if positives:  # an anchor without positive adds 0 (official guard)
            log_probs = [torch.log(torch.exp(anchor @ z[j, m] / t) / denominator) for j, m in positives]
            total = total - (t / t_base) * sum(log_probs) / len(positives)
    return total / len(items)


def _two_view_anchors(z1: torch.Tensor, z2: torch.Tensor):
    """Each of the 2B anchors with its positive and its 2B - 2 negatives, as in SimCLR."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = len(z)
    for a in range(n):
        p = (a + n // 2) % n
        yield a % (n // 2), z[a] @ z[p], torch.stack([z[a] @ z[c] for c in range(n) if c not in (a, p)])


def _ref_dcl_per_anchor(z1: torch.Tensor, z2: torch.Tensor, t: float,
                        sigma: float | None = None) -> torch.Tensor:
    if sigma is None:
        w = [1.0] * B
    else:  # w_i = 2 - e^{s_ii'/sigma} / mean_j e^{s_jj'/sigma}, a constant
        u1, u2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
        s = [(u1[i] @ u2[i]).item() for i in range(B)]
        mean = sum(math.exp(x / sigma) for x in s) / B
        w = [2 - math.exp(x / sigma) / mean for x in s]
    return torch.stack([-w[i] * pos / t + torch.log(torch.exp(negs / t).sum())
                        for i, pos, negs in _two_view_anchors(z1, z2)])


def _ref_debiased(z1: torch.Tensor, z2: torch.Tensor, t: float, tau_plus: float) -> tuple[torch.Tensor, int]:
    """The official estimator written out; also returns how many anchors were clamped."""
    n = 2 * B - 2
    bound = n * math.exp(-1 / t)
    total, clamped = 0.0, 0
    for _, pos, negs in _two_view_anchors(z1, z2):
        e_pos = torch.exp(pos / t)
        ng = (torch.exp(negs / t).sum() - tau_plus * n * e_pos) / (1 - tau_plus)
        if ng < bound:
            ng, clamped = torch.tensor(bound, dtype=torch.float64), clamped + 1
        total = total - torch.log(e_pos / (e_pos + ng))
    return total / (2 * B), clamped


def _assert_matches(loss_fn, ref_fn, *inputs: torch.Tensor, atol: float = 1e-5) -> None:
    value, grads = _grads(loss_fn, *inputs)
    ref_value, ref_grads = _grads(ref_fn, *(x.double() for x in inputs))
    assert abs(value - ref_value) < atol
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.double(), r, atol=atol)


# ----- values and gradients against the references -----

@pytest.mark.parametrize("views", [1, 2, 3])
def test_supcon_matches_reference(views: int) -> None:
    features = _randn(B, views, D, seed=views)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 4])  # classes of 3, 2 and singletons
    _assert_matches(lambda f: supcon_loss(f, labels, 0.1, 0.07),
                    lambda f: _ref_supcon(f, labels, 0.1, 0.07), features)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_dcl_matches_reference(sigma: float | None) -> None:
    z1, z2 = _pairs()
    _assert_matches(lambda a, b: dcl_loss(a, b, 0.1, weighted=sigma is not None, sigma=sigma or 0.5),
                    lambda a, b: _ref_dcl_per_anchor(a, b, 0.1, sigma).mean(), z1, z2)


@pytest.mark.parametrize("tau_plus", [0.05, 0.1])
def test_debiased_matches_reference(tau_plus: float) -> None:
    """0.05: no anchor clamped; 0.1: some anchors (aligned pairs) clamped, the others not."""
    z1, z2 = _half_aligned_pairs()
    _, clamped = _ref_debiased(z1, z2, 0.5, tau_plus)
    assert clamped == 0 if tau_plus == 0.05 else 0 < clamped < 2 * B
    _assert_matches(lambda a, b: debiased_nt_xent(a, b, 0.5, tau_plus),
                    lambda a, b: _ref_debiased(a, b, 0.5, tau_plus)[0], z1, z2)


# ----- published reductions -----

def test_supcon_with_distinct_labels_is_scaled_nt_xent() -> None:
    """Only the other view is a positive, so L_out per anchor is NT-Xent's times T / T_base:
    supcon_loss(stack([z1, z2], 1), arange(B), T, T_base) == (T / T_base) * nt_xent(z1, z2, T)."""
    z1, z2 = _pairs()
    features = torch.stack([z1, z2], dim=1)
    supcon = supcon_loss(features, torch.arange(B), 0.1, 0.07)
    assert torch.allclose(supcon, (0.1 / 0.07) * nt_xent(z1, z2, 0.1), atol=1e-5)
    assert torch.allclose(supcon_loss(features, torch.arange(B), 0.2, 0.2), nt_xent(z1, z2, 0.2), atol=1e-5)


def test_supcon_without_positives_is_finite() -> None:
    """One view, every label distinct: no anchor has a positive, each adds 0, no NaN anywhere."""
    value, (grad,) = _grads(lambda f: supcon_loss(f, torch.arange(B)), _randn(B, 1, D, seed=0))
    assert value == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    value, (grad,) = _grads(lambda f: supcon_loss(f, CROSS_RANK_LABELS), _randn(B, 1, D, seed=0))
    assert math.isfinite(value) and value != 0.0 and torch.isfinite(grad).all()


def test_dclw_with_flat_weights_is_dcl() -> None:
    z1, z2 = _pairs()
    assert torch.allclose(dcl_loss(z1, z2, 0.1, weighted=True, sigma=1e6), dcl_loss(z1, z2, 0.1), atol=1e-5)
    assert abs(dcl_loss(z1, z2, 0.1, weighted=True).item() - dcl_loss(z1, z2, 0.1).item()) > 1e-3


def test_dcl_is_nt_xent_without_the_positive_in_the_denominator() -> None:
    """Per anchor, NT-Xent = -log(e^p / (e^p + sum_neg)) = log(1 + e^{DCL}) = softplus(DCL)."""
    z1, z2 = _pairs()
    per_anchor = _ref_dcl_per_anchor(z1, z2, 0.1)
    assert torch.allclose(dcl_loss(z1, z2, 0.1).double(), per_anchor.mean(), atol=1e-5)
    assert torch.allclose(nt_xent(z1, z2, 0.1).double(), F.softplus(per_anchor).mean(), atol=1e-5)
    assert (F.softplus(per_anchor) > per_anchor).all()  # the positive in the denominator always adds


def test_debiased_without_prior_is_nt_xent() -> None:
    """tau_plus = 0: Ng is the sum over the 2B - 2 negatives (the positive excluded), never below
    N e^{-1/T}; e^pos + Ng is NT-Xent's denominator, so the loss and its gradients are nt_xent's."""
    z1, z2 = _pairs()
    value, grads = _grads(lambda a, b: debiased_nt_xent(a, b, 0.5, tau_plus=0.0), z1, z2)
    nt_value, nt_grads = _grads(lambda a, b: nt_xent(a, b, 0.5), z1, z2)
    assert abs(value - nt_value) < 1e-6
    assert all(torch.allclose(g, n, atol=1e-6) for g, n in zip(grads, nt_grads))


@pytest.mark.parametrize("temperature", [0.5, 0.01])
def test_debiased_clamped_everywhere_hits_the_bound(temperature: float) -> None:
    """Aligned pairs: e^pos = e^{1/T} and tau_plus * N * e^{1/T} exceeds the negative sum, so Ng is
    N e^{-1/T} for every anchor and the loss is log(1 + N e^{-2/T}) (finite also at T = 0.01,
    where e^{1/T} overflows float32)."""
    z = _randn(B, D, seed=1)
    n = 2 * B - 2
    expected = math.log1p(n * math.exp(-2 / temperature))
    assert abs(debiased_nt_xent(z, z.clone(), temperature, tau_plus=0.5).item() - expected) < 1e-6


# ----- 2 ranks x B/2 == 1 rank x B -----

def _all_losses(world: int) -> dict[str, tuple[float, list[torch.Tensor]]]:
    """Each loss on this rank's slice; gradients / world as DDP's averaging does to parameters."""
    r, b = distributed.rank(), B // world
    local = slice(r * b, (r + 1) * b)
    z1, z2 = _pairs()
    a1, a2 = _half_aligned_pairs()
    f1, f2 = _randn(B, 1, D, seed=5), _randn(B, 2, D, seed=6)
    labels = CROSS_RANK_LABELS[local]
    cases = {
        "supcon_1view": (lambda f: supcon_loss(f, labels), f1[local]),
        "supcon_2views": (lambda f: supcon_loss(f, labels), f2[local]),
        "dcl": (lambda a, c: dcl_loss(a, c), z1[local], z2[local]),
        "dclw": (lambda a, c: dcl_loss(a, c, weighted=True), z1[local], z2[local]),
        "debiased": (lambda a, c: debiased_nt_xent(a, c), z1[local], z2[local]),
        "debiased_clamped": (lambda a, c: debiased_nt_xent(a, c, tau_plus=0.1), a1[local], a2[local]),
    }
    out = {}
    for name, (fn, *inputs) in cases.items():
        value, grads = _grads(fn, *inputs)
        out[name] = (value, [g / world for g in grads])
    return out


def test_two_ranks_equal_one_rank() -> None:
    single = _all_losses(1)
    halves = run_ranks(_all_losses, 2, 2)
    for name, (value, grads) in single.items():
        assert abs(sum(h[name][0] for h in halves) / 2 - value) < 1e-5, name
        for k, grad in enumerate(grads):
            assert torch.allclose(torch.cat([h[name][1][k] for h in halves]), grad, atol=1e-6), name


def test_split_batch_without_gathering_differs() -> None:
    """Guards for the test above: rank-local labels miss the remote positives, and DCLW's weights
    over half the batch differ from the global ones."""
    f1 = _randn(B, 1, D, seed=5)
    halves = [supcon_loss(f1[s], CROSS_RANK_LABELS[s]) for s in (slice(0, 4), slice(4, 8))]
    assert abs(sum(halves).item() / 2 - supcon_loss(f1, CROSS_RANK_LABELS).item()) > 1e-2
    z1, z2 = _pairs()
    assert not torch.allclose(von_mises_fisher_weights(z1[:4], z2[:4], 0.5),
                              von_mises_fisher_weights(z1, z2, 0.5)[:4], atol=1e-3)


# ----- precision and bad inputs -----

def test_bf16_inputs_give_float32() -> None:
    z1, z2 = (z.bfloat16() for z in _pairs())
    features = torch.stack([z1, z2], dim=1)
    cases = [(supcon_loss, (features, torch.arange(B))), (dcl_loss, (z1, z2)),
             (lambda a, b: dcl_loss(a, b, weighted=True), (z1, z2)), (debiased_nt_xent, (z1, z2))]
    for loss, args in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(*args)
        exact = loss(*(a.float() if a.is_floating_point() else a for a in args))
        assert value.dtype == torch.float32 and torch.allclose(value, exact, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: supcon_loss(torch.randn(4, 8), torch.arange(4)), "features must be"),
    (lambda: supcon_loss(torch.randn(4, 2, 8), torch.arange(3)), "labels must be"),
    (lambda: supcon_loss(torch.randn(4, 2, 8), torch.zeros(4)), "integer class ids"),
    (lambda: supcon_loss(torch.randn(4, 2, 8), torch.arange(4), temperature=0.0), "must be > 0"),
    (lambda: supcon_loss(torch.randn(4, 2, 8), torch.arange(4), base_temperature=-1.0), "must be > 0"),
    (lambda: dcl_loss(torch.randn(4, 8), torch.randn(4, 9)), "must both be"),
    (lambda: dcl_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0), "temperature"),
    (lambda: dcl_loss(torch.randn(4, 8), torch.randn(4, 8), weighted=True, sigma=0.0), "sigma"),
    (lambda: dcl_loss(torch.randn(1, 8), torch.randn(1, 8)), "at least 2 pairs"),
    (lambda: debiased_nt_xent(torch.randn(4, 8), torch.randn(3, 8)), "must both be"),
    (lambda: debiased_nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=-0.5), "temperature"),
    (lambda: debiased_nt_xent(torch.randn(4, 8), torch.randn(4, 8), tau_plus=1.0), r"tau_plus"),
])
def test_bad_inputs_are_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
