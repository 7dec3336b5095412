"""False-negative cancellation, MoCHi and DirectCLR against straightforward float64 loops written
here (google-research/fnc objective.py; MoCHi's paper with davidsvy/hard-negative-mixing and
giakoumoglou/synco; facebookresearch/directclr main.py); their reductions (FNC with no false
negative = NT-Xent, MoCHi with no mixture = MoCo's InfoNCE, DirectCLR's NT-Xent form = NT-Xent on
the sub-vectors); 2 gloo ranks with half the batch each equal 1 process with the whole batch (losses,
input gradients, false negatives, random draws); bf16 inputs compute in float32; bad inputs fail
with a clear error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses import (directclr_loss, fnc_false_negatives, fnc_loss, info_nce, mochi_info_nce, nt_xent,
                             shared_randint, shared_random, shared_uniforms)
from tests.dist_harness import run_ranks

B, D, T = 8, 16, 0.2
FNC_VIEWS, FNC_TOPK, FNC_THRESHOLD = 4, 3, 0.7
QUEUE, HARD, MIX, MIX_QUERY = 24, 6, 5, 3
DIMS = 10  # DirectCLR's d0 out of D
ATOL = 1e-5


# ----------------------------------------------------------------------------- data


def _fnc_views(seed: int = 4) -> list[torch.Tensor]:
    """B images of 3 classes, 4 views each: same-class images are often above the threshold, and
    this seed makes every case occur (see `test_fnc_data_exercises_both_rules`)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randn(3, D, generator=g)[torch.arange(B) % 3]
    images = classes + 0.6 * torch.randn(B, D, generator=g)
    return [images + 0.5 * torch.randn(B, D, generator=g) for _ in range(FNC_VIEWS)]


def _planted_views() -> list[torch.Tensor]:
    """4 orthogonal images (views 0, 1) and one support view each; image 0's support view is
    image 3's first view: image 3 (on the second rank with 2 ranks) is a false negative of image 0
    that only the support view reveals."""
    e = torch.eye(8)
    view0, view1 = e[:4], e[:4] + 0.3 * e[4:]
    support = e[[3, 1, 2, 3]].clone()
    support[3] = e[7]
    return [view0, view1, support]


def _moco_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    return q, k, F.normalize(torch.randn(QUEUE, D, generator=g), dim=1)


def _backbone_pairs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randn(B, D, generator=g)
    return h1, h1 + 0.7 * torch.randn(B, D, generator=g)


# ----------------------------------------------------------------------------- references (float64 loops)


def _reference_false_negatives(views: list[torch.Tensor], topk: int, threshold: float) -> list[set[int]]:
    """For each image i: the candidates c (2B anchor views, view-0 block then view-1 block, not
    views of i) ranked by the max cosine over i's views, top-k of them above the threshold."""
    z = [F.normalize(v.double(), dim=1) for v in views]
    n = len(z[0])
    candidates = torch.cat([z[0], z[1]])
    found = []
    for i in range(n):
        score = {c: max(float(v[i] @ candidates[c]) for v in z) for c in range(2 * n) if c % n != i}
        ranked = sorted(score, key=lambda c: -score[c])[:topk]
        found.append({c for c in ranked if score[c] > threshold})
    return found


def _reference_fnc(z1: torch.Tensor, z2: torch.Tensor, found: list[set[int]], tau: float,
                   mode: str) -> torch.Tensor:
    """Per anchor a (view v of image i), p the other view of i, s = cos / tau:
    attraction  -(s_ap + sum_F s_af) / (1 + |F|) + log sum_{c != a} e^{s_ac};
    elimination -s_ap + log sum_{c != a, c not in F} e^{s_ac}; mean over the 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        i, p = a % n, (a + n) % (2 * n)
        s = {c: z[a] @ z[c] / tau for c in range(2 * n) if c != a}
        if mode == "attraction":
            pulled = s[p] + sum((s[f] for f in found[i]), torch.zeros((), dtype=z.dtype))
            total = total - pulled / (1 + len(found[i])) + torch.logsumexp(torch.stack(list(s.values())), 0)
        else:
            kept = [s[c] for c in s if c not in found[i]]
            total = total - s[p] + torch.logsumexp(torch.stack(kept), 0)
    return total / (2 * n)


def _reference_mochi(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float,
                     seed: int) -> torch.Tensor:
    """MoCo's InfoNCE per query with its mixtures appended; the draws as documented: (B, s)
    tables i, j, a, then (B, s') tables j, u (b = u/2), indices floor(u N) among the N hardest."""
    g = torch.Generator().manual_seed(seed)
    u_i, u_j, u_a = (torch.rand(B, MIX, generator=g).double() for _ in range(3))
    u_j2, u_b = (torch.rand(B, MIX_QUERY, generator=g).double() for _ in range(2))
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)

    def pick(hardest: list[int], u: torch.Tensor) -> torch.Tensor:
        return queue[hardest[min(int(u * HARD), HARD - 1)]]

    total = 0.0
    for row in range(B):
        query = q[row].detach()
        sims = [float(query @ n) for n in queue]
        hard = sorted(range(QUEUE), key=lambda j: -sims[j])[:HARD]
        mixed = [F.normalize(u_a[row, t] * pick(hard, u_i[row, t]) + (1 - u_a[row, t]) * pick(hard, u_j[row, t]),
                             dim=0) for t in range(MIX)]
        mixed += [F.normalize(0.5 * u_b[row, t] * query + (1 - 0.5 * u_b[row, t]) * pick(hard, u_j2[row, t]),
                              dim=0) for t in range(MIX_QUERY)]
        logits = torch.stack([q[row] @ k[row]] + [q[row] @ n for n in queue] + [q[row] @ h for h in mixed]) / tau
        total = total - torch.log_softmax(logits, 0)[0]
    return total / B


def _reference_directclr(h1: torch.Tensor, h2: torch.Tensor, tau: float) -> torch.Tensor:
    """1/2 mean_i [-log e^{z1_i.z2_i/t} / sum_j e^{z1_i.z2_j/t}] + the same with the views swapped."""
    z1, z2 = F.normalize(h1[:, :DIMS], dim=1), F.normalize(h2[:, :DIMS], dim=1)
    total = 0.0
    for i in range(B):
        for a, b in ((z1, z2), (z2, z1)):
            total = total - (a[i] @ b[i] / tau - torch.logsumexp(torch.stack([a[i] @ b[j] / tau for j in range(B)]), 0))
    return total / (2 * B)


def _with_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [x.grad for x in leaves]


# ----------------------------------------------------------------------------- FNC


def _as_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(row.nonzero().flatten().tolist()) for row in mask]


def test_fnc_data_exercises_both_rules() -> None:
    """Guard for the tests below: some images have no false negative, the top-k cuts some above
    the threshold, and some are found only through support views."""
    views = _fnc_views()
    found = _reference_false_negatives(views, FNC_TOPK, FNC_THRESHOLD)
    unlimited = _reference_false_negatives(views, 2 * B, FNC_THRESHOLD)
    anchors_only = _reference_false_negatives(views[:2], FNC_TOPK, FNC_THRESHOLD)
    assert any(not f for f in found)
    assert any(len(u) > FNC_TOPK for u in unlimited)
    assert any(a != f for a, f in zip(anchors_only, found))


def test_fnc_false_negatives_match_reference() -> None:
    views = _fnc_views()
    assert _as_sets(fnc_false_negatives(views, FNC_TOPK, FNC_THRESHOLD)) == \
        _reference_false_negatives(views, FNC_TOPK, FNC_THRESHOLD)


@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_fnc_matches_reference(mode: str) -> None:
    views = _fnc_views()
    found = _reference_false_negatives(views, FNC_TOPK, FNC_THRESHOLD)
    loss, grads = _with_grads(lambda a, b: fnc_loss([a, b, *views[2:]], T, FNC_TOPK, FNC_THRESHOLD, mode),
                              views[0], views[1])
    ref, ref_grads = _with_grads(lambda a, b: _reference_fnc(a, b, found, T, mode),
                                 views[0].double(), views[1].double())
    assert abs(loss.item() - ref.item()) < ATOL
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.double(), r, atol=ATOL)
    assert abs(loss.item() - nt_xent(views[0], views[1], T).item()) > 1e-2  # false negatives changed it


@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_fnc_without_false_negatives_is_nt_xent(mode: str) -> None:
    views = _fnc_views()
    loss, grads = _with_grads(lambda a, b: fnc_loss([a, b, *views[2:]], T, FNC_TOPK, 1.01, mode),
                              views[0], views[1])
    ref, ref_grads = _with_grads(lambda a, b: nt_xent(a, b, T), views[0], views[1])
    assert abs(loss.item() - ref.item()) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-7)


def test_fnc_support_views_get_no_gradient() -> None:
    views = [v.clone().requires_grad_() for v in _fnc_views()]
    fnc_loss(views, T, FNC_TOPK, FNC_THRESHOLD).backward()
    assert all(v.grad is None for v in views[2:]) and views[0].grad.abs().sum() > 0


def test_fnc_planted_false_negative_found_through_support_view() -> None:
    views = _planted_views()
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0, [3, 7]] = True  # both views of image 3
    assert torch.equal(fnc_false_negatives(views, FNC_TOPK, FNC_THRESHOLD), expected)
    assert not fnc_false_negatives(views[:2], FNC_TOPK, FNC_THRESHOLD).any()
    # the threshold is strict, as the official tf.math.greater: a copy (cosine 1) is not above 1
    assert not fnc_false_negatives(views, FNC_TOPK, 1.0).any()


# ----------------------------------------------------------------------------- MoCHi


def test_mochi_matches_reference() -> None:
    q, k, queue = _moco_inputs()
    loss, (grad,) = _with_grads(lambda x: mochi_info_nce(x, k, queue, T, HARD, MIX, MIX_QUERY,
                                                         torch.Generator().manual_seed(7)), q)
    ref, (ref_grad,) = _with_grads(lambda x: _reference_mochi(x, k.double(), queue.double(), T, 7), q.double())
    assert abs(loss.item() - ref.item()) < ATOL
    assert torch.allclose(grad.double(), ref_grad, atol=ATOL)
    assert loss > info_nce(q, k, T, queue) + 1e-2  # the mixtures are negatives: they raise the loss


def test_mochi_without_mixtures_is_info_nce() -> None:
    q, k, queue = _moco_inputs()
    loss, (grad,) = _with_grads(lambda x: mochi_info_nce(x, k, queue, T, HARD, 0, 0), q)
    ref, (ref_grad,) = _with_grads(lambda x: info_nce(x, k, T, queue), q)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_mochi_draws_per_query_and_advances_generator_alike() -> None:
    """Two calls on one generator give new mixtures; two generators seeded alike give the same."""
    q, k, queue = _moco_inputs()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = mochi_info_nce(q, k, queue, T, HARD, MIX, MIX_QUERY, g1)
    assert torch.equal(first, mochi_info_nce(q, k, queue, T, HARD, MIX, MIX_QUERY, g2))
    assert not torch.equal(first, mochi_info_nce(q, k, queue, T, HARD, MIX, MIX_QUERY, g1))


# ----------------------------------------------------------------------------- DirectCLR


def test_directclr_matches_published_form() -> None:
    h1, h2 = _backbone_pairs()
    loss, grads = _with_grads(lambda a, b: directclr_loss(a, b, DIMS, T), h1, h2)
    ref, ref_grads = _with_grads(lambda a, b: _reference_directclr(a, b, T), h1.double(), h2.double())
    assert abs(loss.item() - ref.item()) < ATOL
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.double(), r, atol=ATOL)
        assert not g[:, DIMS:].any()  # only the first d0 dimensions are trained


def test_directclr_same_view_negatives_is_nt_xent_on_the_subvectors() -> None:
    h1, h2 = _backbone_pairs()
    loss, grads = _with_grads(lambda a, b: directclr_loss(a, b, DIMS, T, same_view_negatives=True), h1, h2)
    ref, ref_grads = _with_grads(lambda a, b: nt_xent(a[:, :DIMS], b[:, :DIMS], T), h1, h2)
    assert torch.equal(loss, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    assert abs(loss.item() - directclr_loss(h1, h2, DIMS, T).item()) > 1e-2  # the two forms differ


# ----------------------------------------------------------------------------- 2 ranks == 1


def _local(t: torch.Tensor, world: int) -> torch.Tensor:
    b = len(t) // world
    r = distributed.rank()
    return t[r * b:(r + 1) * b].clone().requires_grad_()


def _all_losses(world: int) -> dict[str, object]:
    """Every loss on this rank's slice; gradients / world, as DDP averages parameter gradients."""
    out: dict[str, object] = {}
    views = _fnc_views()
    for mode in ("attraction", "elimination"):
        mine = [_local(v, world) for v in views]
        loss = fnc_loss(mine, T, FNC_TOPK, FNC_THRESHOLD, mode)
        loss.backward()
        out[f"fnc_{mode}"] = (loss.item(), [v.grad / world for v in mine[:2]])
    out["fnc_found"] = fnc_false_negatives([_local(v, world).detach() for v in views], FNC_TOPK, FNC_THRESHOLD)
    planted = [_local(v, world) for v in _planted_views()]
    out["planted_found"] = fnc_false_negatives([v.detach() for v in planted], FNC_TOPK, FNC_THRESHOLD)
    loss = fnc_loss(planted, T, FNC_TOPK, FNC_THRESHOLD)
    loss.backward()
    out["planted"] = (loss.item(), [v.grad / world for v in planted[:2]])

    q, k, queue = _moco_inputs()
    mine_q, g = _local(q, world), torch.Generator().manual_seed(7)
    loss = mochi_info_nce(mine_q, _local(k, world).detach(), queue, T, HARD, MIX, MIX_QUERY, g)
    loss.backward()
    out["mochi"] = (loss.item(), [mine_q.grad / world])
    out["generator_after"] = g.get_state()

    h1, h2 = _backbone_pairs()
    for same_view in (False, True):
        a, b = _local(h1, world), _local(h2, world)
        loss = directclr_loss(a, b, DIMS, T, same_view_negatives=same_view)
        loss.backward()
        out[f"directclr_{same_view}"] = (loss.item(), [a.grad / world, b.grad / world])
    return out


def test_two_ranks_equal_one_rank() -> None:
    single = _all_losses(1)
    pair = run_ranks(_all_losses, 2, 2)
    for key in ("fnc_attraction", "fnc_elimination", "planted", "mochi", "directclr_False", "directclr_True"):
        assert abs(sum(p[key][0] for p in pair) / 2 - single[key][0]) < ATOL, key
        for i, grad in enumerate(single[key][1]):
            assert torch.allclose(torch.cat([p[key][1][i] for p in pair]), grad, atol=ATOL), key
    for key in ("fnc_found", "planted_found"):
        assert torch.equal(torch.cat([p[key] for p in pair]), single[key]), key
    assert pair[0]["planted_found"][0, [3, 7]].all()  # image 3 lives on rank 1
    assert all(torch.equal(p["generator_after"], single["generator_after"]) for p in pair)


def test_shared_uniforms_split_equals_one_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 ranks of 5 rows, drawn in pieces of 7 numbers (several pieces, boundaries inside every
    rank's rows), equal one (15, 4) draw, and leave the generator where that draw does."""
    monkeypatch.setattr(shared_random, "UNIFORM_CHUNK", 7)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    whole = torch.Generator().manual_seed(5)
    table = torch.rand(15, 4, generator=whole)
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        g = torch.Generator().manual_seed(5)
        assert torch.equal(shared_uniforms(5, 4, g, torch.device("cpu")), table[5 * r:5 * r + 5])
        assert torch.equal(g.get_state(), whole.get_state())
    g = torch.Generator().manual_seed(5)
    assert torch.equal(shared_randint(5, 4, 3, g, torch.device("cpu")), (table[10:] * 3).long())


# ----------------------------------------------------------------------------- precision and errors


def test_bf16_inputs_compute_in_float32() -> None:
    views = [v.bfloat16() for v in _fnc_views()]
    q, k, queue = (x.bfloat16() for x in _moco_inputs())
    h1, h2 = (x.bfloat16() for x in _backbone_pairs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = [
            (fnc_loss(views, T, FNC_TOPK, FNC_THRESHOLD), fnc_loss([v.float() for v in views], T, FNC_TOPK,
                                                                   FNC_THRESHOLD)),
            (mochi_info_nce(q, k, queue, T, HARD, MIX, MIX_QUERY, torch.Generator().manual_seed(1)),
             mochi_info_nce(q.float(), k.float(), queue.float(), T, HARD, MIX, MIX_QUERY,
                            torch.Generator().manual_seed(1))),
            (directclr_loss(h1, h2, DIMS, T), directclr_loss(h1.float(), h2.float(), DIMS, T)),
        ]
    for bf16, fp32 in results:
        assert bf16.dtype == torch.float32 and torch.equal(bf16, fp32)


def test_bad_inputs_fail_clearly() -> None:
    views = _fnc_views()
    q, k, queue = _moco_inputs()
    h1, h2 = _backbone_pairs()
    g = torch.Generator()
    cases = [
        (lambda: fnc_loss(views[:1]), "views must be a list of >= 2"),
        (lambda: fnc_loss(views[0]), "views must be a list of >= 2"),
        (lambda: fnc_loss([views[0], views[1][:4]]), "same \\(b, d\\)"),
        (lambda: fnc_loss(views, mode="repel"), "mode must be one of"),
        (lambda: fnc_loss(views, topk=-1), "topk must be >= 0"),
        (lambda: fnc_loss(views, temperature=0.0), "temperature must be > 0"),
        (lambda: mochi_info_nce(q, k, queue, T, QUEUE + 1, 1, 1, g), "num_hard must lie in \\[1, K=24\\]"),
        (lambda: mochi_info_nce(q, k, queue, T, 0, 1, 1, g), "num_hard must lie in"),
        (lambda: mochi_info_nce(q, k[:4], queue, T, HARD, 1, 1, g), "q and k must both be"),
        (lambda: mochi_info_nce(q, k, queue[:, :4], T, HARD, 1, 1, g), "queue must be \\(K, 16\\)"),
        (lambda: mochi_info_nce(q, k, queue, T, HARD, -1, 1, g), "must be >= 0"),
        (lambda: mochi_info_nce(q, k, queue, T, HARD, 1, 0), "a generator"),
        (lambda: directclr_loss(h1, h2, 0), "dims must lie in \\[1, 16\\]"),
        (lambda: directclr_loss(h1, h2, D + 1), "dims must lie in"),
        (lambda: directclr_loss(h1, h2[:4], DIMS), "h1 and h2 must both be"),
        (lambda: shared_randint(2, 2, 0, g, torch.device("cpu")), "high must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
