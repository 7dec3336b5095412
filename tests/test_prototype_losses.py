"""PCL's ProtoNCE and HCSC's selections and losses against transcriptions of the official code
(salesforce/PCL pcl/builder.py, hirl-team/HCSC hcsc/hcsc.py and pretrain.py), written here
separately; 2 gloo ranks with half the batch each equal 1 process with the whole batch (losses,
query gradients, masks); bf16 inputs compute in float32; bad inputs get a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses import (hcsc_instance_masks, hcsc_instance_nce, hcsc_proto_nce, hcsc_prototype_masks,
                             proto_nce)
from tests.dist_harness import run_ranks

B, D, QUEUE, T = 8, 16, 32, 0.2
LEVELS = (12, 6, 3)  # HCSC cluster counts, fine to coarse
PCL_K, PCL_R = 40, 10  # PCL clusters and sampled negatives (< the 32+ free clusters)
ATOL = 1e-6


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    queue: torch.Tensor
    pcl_ids: torch.Tensor
    pcl_centroids: torch.Tensor
    pcl_density: torch.Tensor
    ids: torch.Tensor  # level-0 cluster of each sample
    parents: list[torch.Tensor]
    centroids: list[torch.Tensor]
    density: list[torch.Tensor]


def _problem(seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, D, generator=g), dim=1)

    def phi(n: int) -> torch.Tensor:
        return 0.1 + 0.2 * torch.rand(n, generator=g)

    return Problem(
        q=torch.randn(B, D, generator=g), k=torch.randn(B, D, generator=g), queue=unit(QUEUE),
        pcl_ids=torch.randint(0, PCL_K, (B,), generator=g), pcl_centroids=unit(PCL_K), pcl_density=phi(PCL_K),
        ids=torch.randint(0, LEVELS[0], (B,), generator=g),
        parents=[torch.randint(0, up, (n,), generator=g) for n, up in pairwise(LEVELS)],
        centroids=[unit(n) for n in LEVELS], density=[phi(n) for n in LEVELS])


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _free(positives: np.ndarray, count: int) -> np.ndarray:
    return np.array(sorted(set(range(count)) - set(positives.tolist())), dtype=np.int64)


def _composed(ids: np.ndarray, parents: list[torch.Tensor]) -> list[np.ndarray]:
    out = [ids]
    for up in parents:
        out.append(up.numpy()[out[-1]])
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- PCL


def _official_proto_nce(q: np.ndarray, ids: np.ndarray, centroids: np.ndarray, density: np.ndarray,
                        negatives: np.ndarray) -> tuple[float, np.ndarray]:
    """pcl/builder.py's logits (q.[c_pos; c_neg]^T / phi, target i) and CE, with the gradient
    w.r.t. the unnormalised q by hand: dL/dlogits = (softmax - onehot) / b, through the
    normalisation (I - qn qn^T) / |q|."""
    q, centroids, density = q.astype(np.float64), centroids.astype(np.float64), density.astype(np.float64)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    qn = q / norm
    columns = np.concatenate([ids, negatives])
    w = centroids[columns].T / density[columns]  # (d, M)
    p = _softmax(qn @ w)
    b = len(q)
    loss = -np.log(p[np.arange(b), np.arange(b)]).mean()
    d_logits = (p - np.eye(b, p.shape[1])) / b
    d_qn = d_logits @ w.T
    d_q = (d_qn - qn * (qn * d_qn).sum(axis=1, keepdims=True)) / norm
    return float(loss), d_q


def _proto_nce_and_grad(p: Problem, num_negatives: int, seed: int) -> tuple[float, np.ndarray]:
    q = p.q.clone().requires_grad_()
    loss = proto_nce(q, p.pcl_ids, p.pcl_centroids, p.pcl_density, num_negatives, _seeded(seed))
    loss.backward()
    return loss.item(), q.grad.numpy()


def test_proto_nce_matches_official_formula_with_drawn_negatives() -> None:
    """Negatives: PCL_R of the clusters in no sample's batch, drawn as a permutation of the free
    ids (ascending) by the shared generator."""
    p = _problem()
    free = _free(p.pcl_ids.numpy(), PCL_K)
    negatives = free[torch.randperm(len(free), generator=_seeded(3))[:PCL_R].numpy()]
    assert len(negatives) == PCL_R and not set(negatives) & set(p.pcl_ids.tolist())
    loss, grad = _proto_nce_and_grad(p, PCL_R, seed=3)
    want_loss, want_grad = _official_proto_nce(p.q.numpy(), p.pcl_ids.numpy(), p.pcl_centroids.numpy(),
                                               p.pcl_density.numpy(), negatives)
    assert abs(loss - want_loss) < 1e-5
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_proto_nce_uses_every_free_cluster_when_fewer_than_asked() -> None:
    """r above the free count: all free clusters, the highest id included (the official
    `range(im2cluster.max())` would skip it); the result does not depend on the draw."""
    p = _problem()
    free = _free(p.pcl_ids.numpy(), PCL_K)
    assert PCL_K - 1 in free
    want_loss, want_grad = _official_proto_nce(p.q.numpy(), p.pcl_ids.numpy(), p.pcl_centroids.numpy(),
                                               p.pcl_density.numpy(), free)
    for seed in (0, 1):
        loss, grad = _proto_nce_and_grad(p, PCL_K, seed)
        assert abs(loss - want_loss) < 1e-5
        np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_per_gpu_positives_would_differ() -> None:
    """Guard for the 2-ranks test: the official per-GPU positives (each half on its own) give
    another loss than the global batch's, so the test below sees the gather."""
    p = _problem()
    full = proto_nce(p.q, p.pcl_ids, p.pcl_centroids, p.pcl_density, PCL_K, _seeded(0))
    halves = [proto_nce(p.q[s], p.pcl_ids[s], p.pcl_centroids, p.pcl_density, PCL_K, _seeded(0))
              for s in (slice(0, B // 2), slice(B // 2, B))]
    assert abs(full.item() - sum(h.item() for h in halves) / 2) > 1e-3


# ----------------------------------------------------------------------------- HCSC selections


def _instance_keep_probability(p: Problem, ids: np.ndarray, centroids: list[torch.Tensor],
                               density: list[torch.Tensor]) -> list[np.ndarray]:
    """hcsc.py sample_neg_instance: 1 - softmax(queue.c / clamp(phi, 1e-3))[:, label].T, clamped."""
    out = []
    for labels, c, phi in zip(_composed(ids, p.parents), centroids, density):
        logits = p.queue.double().numpy() @ c.double().numpy().T / np.maximum(phi.double().numpy(), 1e-3)
        out.append(np.clip(1 - _softmax(logits)[:, labels].T, 0.0, 0.999))
    return out


def _uniforms(seed: int, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """The shared generator's draws, one (B, n) table per level in level order."""
    g = _seeded(seed)
    return [torch.rand(*shape, generator=g).double().numpy() for shape in shapes]


def test_instance_masks_follow_official_probability() -> None:
    p = _problem()
    masks = hcsc_instance_masks(p.queue, p.ids, p.parents, p.centroids, p.density, _seeded(4))
    keep = _instance_keep_probability(p, p.ids.numpy(), p.centroids, p.density)
    for mask, prob, u in zip(masks, keep, _uniforms(4, [(B, QUEUE)] * len(LEVELS))):
        assert mask.dtype == torch.bool
        np.testing.assert_array_equal(mask.numpy(), u < prob)


def _basis_hierarchy(p: Problem) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Level-0 centroids are basis vectors; each upper centroid is the normalised sum of its
    children's (every cluster has children): a child's dot with its parent is >= 0.5, with any
    other centroid 0. Sets `p`'s parents; returns the centroids and, for each level-0 cluster,
    its cluster at every level."""
    p.parents = [torch.arange(n) % up for n, up in pairwise(LEVELS)]
    basis = torch.eye(D)[:LEVELS[0]]
    centroids, members = [basis], [np.arange(LEVELS[0])]
    for up, n in zip(p.parents, LEVELS[1:]):
        sums = torch.zeros(n, D).index_add_(0, up, centroids[-1])
        centroids.append(F.normalize(sums, dim=1))
        members.append(up.numpy()[members[-1]])
    return centroids, members


def test_instance_selection_drops_queue_items_of_the_query_cluster() -> None:
    """Queue items equal to level-0 centroids and phi tiny: the softmax is one-hot on the item's
    own cluster at each level, so p = 0 (always dropped) for items in the query's cluster and
    p = 1, clamped to 0.999, for the others."""
    p = _problem()
    centroids, members = _basis_hierarchy(p)
    item_cluster = torch.randint(0, LEVELS[0], (QUEUE,), generator=_seeded(9))
    p.queue = centroids[0][item_cluster]
    tiny = [torch.full((n,), 1e-4) for n in LEVELS]
    masks = hcsc_instance_masks(p.queue, p.ids, p.parents, centroids, tiny, _seeded(5))
    uniforms = _uniforms(5, [(B, QUEUE)] * len(LEVELS))
    for level, (mask, u) in enumerate(zip(masks, uniforms)):
        same = members[level][p.ids.numpy()][:, None] == members[level][item_cluster.numpy()][None, :]
        assert same.any() and (~same).any()
        np.testing.assert_array_equal(mask.numpy(), ~same & (u < 0.999))


def _prototype_keep_probability(ids: np.ndarray, parents: list[torch.Tensor], centroids: list[torch.Tensor],
                                density: list[torch.Tensor], negatives: list[np.ndarray]) -> list[np.ndarray]:
    """hcsc.py sample_neg_protos: 1 - softmax(c_l.c_{l+1}^T / (phi_{l+1} / mean * T))[neg][:, parent].T."""
    labels = _composed(ids, parents)
    out = []
    for level in range(len(centroids) - 1):
        phi = density[level + 1].double().numpy()
        lower, upper = centroids[level].double().numpy(), centroids[level + 1].double().numpy()
        logits = lower @ upper.T / (phi / phi.mean() * T)
        prob = 1 - _softmax(logits)[negatives[level]][:, labels[level + 1]].T
        out.append(np.clip(prob, 1e-4, 0.999))
    return out


def test_prototype_masks_follow_official_probability() -> None:
    p = _problem()
    negatives, masks = hcsc_prototype_masks(p.ids, p.parents, p.centroids, p.density, T, _seeded(6))
    want_negatives = [_free(ids, n) for ids, n in zip(_composed(p.ids.numpy(), p.parents), LEVELS)]
    assert [n.tolist() for n in negatives] == [n.tolist() for n in want_negatives]
    assert len(masks) == len(LEVELS) - 1  # the top level keeps all its negatives
    keep = _prototype_keep_probability(p.ids.numpy(), p.parents, p.centroids, p.density, want_negatives)
    for mask, prob, u in zip(masks, keep, _uniforms(6, [(B, len(n)) for n in want_negatives[:-1]])):
        np.testing.assert_array_equal(mask.numpy(), u < prob)


def test_prototype_selection_drops_negatives_under_the_positive_parent() -> None:
    """One-hot parent affinities (T tiny): a negative sharing the positive's parent has p = 0,
    clamped to 1e-4; any other p = 1, clamped to 0.999."""
    p = _problem()
    centroids, members = _basis_hierarchy(p)
    negatives, masks = hcsc_prototype_masks(p.ids, p.parents, centroids, p.density, 1e-4, _seeded(7))
    uniforms = _uniforms(7, [(B, len(n)) for n in negatives[:-1]])
    for level, (mask, u) in enumerate(zip(masks, uniforms)):
        parent = p.parents[level].numpy()
        sibling = members[level + 1][p.ids.numpy()][:, None] == parent[negatives[level].numpy()][None, :]
        assert sibling.any() and (~sibling).any()
        np.testing.assert_array_equal(mask.numpy(), np.where(sibling, u < 1e-4, u < 0.999))


# ----------------------------------------------------------------------------- HCSC losses


def test_instance_nce_matches_official_for_fixed_masks() -> None:
    """hcsc.py forward + pretrain.py: per level cat([q.k, (q.queue^T) * mask]) / T, CE at 0,
    summed over levels. A dropped negative still adds e^0 to the denominator."""
    p = _problem()
    masks = [torch.rand(B, QUEUE, generator=_seeded(level)) < 0.5 for level in range(len(LEVELS))]
    q = p.q.clone().requires_grad_()
    loss = hcsc_instance_nce(q, p.k, p.queue, masks, T)
    loss.backward()

    q64 = p.q.double().requires_grad_()
    qn, kn = F.normalize(q64, dim=1), F.normalize(p.k.double(), dim=1)
    l_pos = torch.einsum("nc,nc->n", qn, kn).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", qn, p.queue.double().T)
    labels = torch.zeros(B, dtype=torch.long)
    want = sum(F.cross_entropy(torch.cat([l_pos, l_neg * m.double()], dim=1) / T, labels) for m in masks)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5
    assert torch.allclose(q.grad.double(), q64.grad, atol=ATOL)

    nothing = [torch.zeros(B, QUEUE, dtype=torch.bool)]
    s = (qn * kn).sum(dim=1).detach() / T
    by_hand = (-(s - torch.log(torch.exp(s) + QUEUE))).mean()
    assert abs(hcsc_instance_nce(p.q, p.k, p.queue, nothing, T).item() - by_hand.item()) < 1e-5


def test_proto_nce_matches_official_for_drawn_masks() -> None:
    """hcsc.py get_protos + pretrain.py: per level cat([q.c_pos, (q.c_neg^T) * mask]) / phi of each
    column, CE at 0 (the top level unmasked), averaged over levels; negatives are the clusters in
    no sample's batch; the masks are the ones the same seed draws."""
    p = _problem()
    _, masks = hcsc_prototype_masks(p.ids, p.parents, p.centroids, p.density, T, _seeded(8))
    q = p.q.clone().requires_grad_()
    loss = hcsc_proto_nce(q, p.ids, p.parents, p.centroids, p.density, T, _seeded(8))
    loss.backward()

    q64 = p.q.double().requires_grad_()
    qn = F.normalize(q64, dim=1)
    terms = []
    for level, ids in enumerate(_composed(p.ids.numpy(), p.parents)):
        c, phi = p.centroids[level].double(), p.density[level].double()
        pos, neg = torch.from_numpy(ids), torch.from_numpy(_free(ids, LEVELS[level]))
        neg_logits = qn @ c[neg].T
        if level < len(masks):
            neg_logits = neg_logits * masks[level].double()
        logits = torch.cat([(qn * c[pos]).sum(1, keepdim=True), neg_logits], dim=1)
        temp_map = torch.cat([phi[pos].unsqueeze(-1), phi[neg].unsqueeze(0).repeat(B, 1)], dim=1)
        terms.append(F.cross_entropy(logits / temp_map, torch.zeros(B, dtype=torch.long)))
    want = sum(terms) / len(LEVELS)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5
    assert torch.allclose(q.grad.double(), q64.grad, atol=ATOL)


# ----------------------------------------------------------------------------- 2 ranks == 1


def _losses_and_grads(world: int) -> dict[str, tuple]:
    """Every loss on this rank's rows; query gradients divided by the world size, as DDP's
    averaging scales them; the drawn masks."""
    p = _problem()
    b = B // world
    rows = slice(distributed.rank() * b, distributed.rank() * b + b)
    out = {}

    def run(name: str, fn) -> None:
        q = p.q[rows].clone().requires_grad_()
        loss = fn(q)
        loss.backward()
        out[name] = (loss.item(), q.grad / world)

    run("pcl", lambda q: proto_nce(q, p.pcl_ids[rows], p.pcl_centroids, p.pcl_density, PCL_R, _seeded(1)))
    instance_masks = hcsc_instance_masks(p.queue, p.ids[rows], p.parents, p.centroids, p.density, _seeded(2))
    run("instance", lambda q: hcsc_instance_nce(q, p.k[rows], p.queue, instance_masks, T))
    run("proto", lambda q: hcsc_proto_nce(q, p.ids[rows], p.parents, p.centroids, p.density, T, _seeded(3)))
    out["instance_masks"] = instance_masks
    _, out["proto_masks"] = hcsc_prototype_masks(p.ids[rows], p.parents, p.centroids, p.density, T, _seeded(3))
    return out


def test_two_ranks_equal_one_process() -> None:
    single = _losses_and_grads(1)
    pair = run_ranks(_losses_and_grads, 2, 2)
    for name in ("pcl", "instance", "proto"):
        assert abs(sum(r[name][0] for r in pair) / 2 - single[name][0]) < ATOL, name
        assert torch.allclose(torch.cat([r[name][1] for r in pair]), single[name][1], atol=ATOL), name
    for name in ("instance_masks", "proto_masks"):
        for level, whole in enumerate(single[name]):
            assert torch.equal(torch.cat([r[name][level] for r in pair]), whole), (name, level)


# ----------------------------------------------------------------------------- precision and errors


def _all_losses(p: Problem) -> list[torch.Tensor]:
    masks = hcsc_instance_masks(p.queue, p.ids, p.parents, p.centroids, p.density, _seeded(0))
    return [proto_nce(p.q, p.pcl_ids, p.pcl_centroids, p.pcl_density, PCL_R, _seeded(0)),
            hcsc_instance_nce(p.q, p.k, p.queue, masks, T),
            hcsc_proto_nce(p.q, p.ids, p.parents, p.centroids, p.density, T, _seeded(0))]


def test_bf16_inputs_compute_in_float32() -> None:
    """bf16 inputs under bf16 autocast give the float32 result of the same (bf16-rounded) values."""
    p = _problem()
    for field in ("q", "k", "queue", "pcl_centroids", "pcl_density"):
        setattr(p, field, getattr(p, field).bfloat16())
    p.centroids = [c.bfloat16() for c in p.centroids]
    p.density = [d.bfloat16() for d in p.density]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _all_losses(p)
    for field in ("q", "k", "queue", "pcl_centroids", "pcl_density"):
        setattr(p, field, getattr(p, field).float())
    p.centroids = [c.float() for c in p.centroids]
    p.density = [d.float() for d in p.density]
    for got, want in zip(low, _all_losses(p)):
        assert got.dtype == torch.float32
        assert abs(got.item() - want.item()) < ATOL


def _call(what: str, change: dict) -> None:
    """One function on the test problem with `change`'s fields replaced (r, t and masks: arguments)."""
    p = _problem()
    options = {"r": PCL_R, "t": T, "masks": [torch.ones(B, QUEUE, dtype=torch.bool)]}
    for field, value in change.items():
        if field in options:
            options[field] = value
        else:
            setattr(p, field, value)
    gen = _seeded(0)
    if what == "pcl":
        proto_nce(p.q, p.pcl_ids, p.pcl_centroids, p.pcl_density, options["r"], gen)
    elif what == "instance_masks":
        hcsc_instance_masks(p.queue, p.ids, p.parents, p.centroids, p.density, gen)
    elif what == "instance":
        hcsc_instance_nce(p.q, p.k, p.queue, options["masks"], options["t"])
    else:
        hcsc_proto_nce(p.q, p.ids, p.parents, p.centroids, p.density, options["t"], gen)


@pytest.mark.parametrize("what, change, message", [
    ("pcl", {"q": torch.randn(B)}, r"q must be \(b, d\)"),
    ("pcl", {"pcl_ids": torch.zeros(B - 1, dtype=torch.long)}, r"cluster_ids must be \(8,\)"),
    ("pcl", {"pcl_ids": torch.full((B,), PCL_K)}, r"cluster_ids must lie in \[0, 40\)"),
    ("pcl", {"pcl_ids": torch.zeros(B)}, "integer tensor"),
    ("pcl", {"pcl_centroids": torch.randn(PCL_K, D + 1)}, r"centroids must be \(k, 16\)"),
    ("pcl", {"pcl_density": torch.zeros(PCL_K)}, "density .* must be > 0"),
    ("pcl", {"r": -1}, "num_negatives must be >= 0"),
    ("instance_masks", {"queue": torch.randn(QUEUE)}, r"queue must be \(K, d\)"),
    ("instance_masks", {"parents": []}, "L-1 parents"),
    ("instance_masks", {"ids": torch.full((B,), -1)}, r"must lie in \[0, 12\)"),
    ("proto", {"parents": [torch.zeros(LEVELS[0], dtype=torch.long), torch.full((LEVELS[1],), 3)]},
     r"parents\[1\] must lie in \[0, 3\)"),
    ("proto", {"parents": [torch.zeros(5, dtype=torch.long), torch.zeros(LEVELS[1], dtype=torch.long)]},
     r"parents\[0\] must be \(12,\)"),
    ("proto", {"t": 0.0}, "temperature must be > 0"),
    ("instance", {"t": -1.0}, "temperature must be > 0"),
    ("instance", {"masks": []}, "keep_masks must hold one mask per level"),
    ("instance", {"k": torch.randn(B, D + 1)}, "q and k must both be"),
])
def test_bad_inputs_get_clear_errors(what: str, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(what, change)
