"""Whole-dataset clustering of PCL and HCSC (sslforge.clustering), against numpy references.

faiss's k-means is trusted for where it puts the centroids; everything read from them is checked
independently: the assignments are the nearest centroid and the distances are the squared L2 of
a numpy brute force, the concentration phi equals a numpy transcription of PCL's `run_kmeans`
written here, HCSC's upper levels cluster the normalised lower centroids and compose the sample
assignments through `parents`. The result of one rank's clustering reaches the other ranks
exactly, by device-checked broadcasts, and a failure there reaches them as an error.
"""
from __future__ import annotations

from typing import Any, Callable

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.clustering import (Clustering, concentration, hierarchical_clusterings, kmeans, pcl_clusterings,
                                 shared_clusterings)
from tests import emulated_device
from tests.dist_harness import run_ranks
from tests.emulated_device import on_device

TEMPERATURE = 0.2
N, DIM, BLOBS = 1200, 16, 12


def _features(n: int = N, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """L2-normalised points around BLOBS random directions, as momentum features look."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(BLOBS, dim, generator=g)
    points = centres[torch.randint(BLOBS, (n,), generator=g)] + 0.4 * torch.randn(n, dim, generator=g)
    return F.normalize(points, dim=1)


def _sq_dists(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, k) squared L2 distances in float64, by broadcasting."""
    diff = points.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None, :, :]
    return (diff ** 2).sum(-1)


def _reference_phi(sq_dist: np.ndarray, assignments: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """PCL's concentration, cluster by cluster as `main_pcl.py:run_kmeans` writes it."""
    members: list[list[float]] = [[] for _ in range(k)]
    for dist, cluster in zip(sq_dist, assignments):
        members[cluster].append(float(dist))
    phi = np.array([np.mean(np.sqrt(m)) / np.log(len(m) + 10) if len(m) > 1 else 0.0 for m in members])
    phi[[len(m) <= 1 for m in members]] = phi.max()
    low, high = np.percentile(phi, 10), np.percentile(phi, 90)
    phi = np.minimum(np.maximum(phi, low), high)
    return temperature * phi / phi.mean()


def _assert_nearest(points: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> None:
    """Every point goes to a nearest centroid; exactly numpy's argmin wherever it is not a near tie."""
    d2 = _sq_dists(points, centroids)
    rows = np.arange(len(points))
    np.testing.assert_allclose(d2[rows, assignments], d2.min(1), rtol=1e-5, atol=1e-6)
    ordered = np.sort(d2, axis=1)
    clear = ordered[:, 1] - ordered[:, 0] > 1e-4 if d2.shape[1] > 1 else np.ones(len(points), bool)
    assert clear.mean() > 0.95  # the check below is not vacuous
    np.testing.assert_array_equal(assignments[clear], d2.argmin(1)[clear])


# ---------------------------------------------------------------------------- k-means, phi
def test_kmeans_assignments_and_distances_match_numpy() -> None:
    x = _features().numpy()
    centroids, assignments, sq_dist = kmeans(x, 10, seed=0, use_gpu=False)
    assert centroids.shape == (10, DIM) and centroids.dtype == np.float32
    assert assignments.shape == (N,) and assignments.dtype == np.int64
    assert sq_dist.shape == (N,)
    _assert_nearest(x, centroids, assignments)
    d2 = _sq_dists(x, centroids)
    np.testing.assert_allclose(sq_dist, d2[np.arange(N), assignments], rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(centroids, axis=1), 1.0)  # returned before normalisation
    assert len(np.unique(assignments)) == 10


def test_concentration_equals_the_published_formula_on_kmeans_output() -> None:
    x = _features().numpy()
    k = 40
    _, assignments, sq_dist = kmeans(x, k, seed=1, use_gpu=False)
    phi = concentration(sq_dist, assignments, k, TEMPERATURE)
    np.testing.assert_allclose(phi, _reference_phi(sq_dist, assignments, k, TEMPERATURE), rtol=1e-6)
    assert phi.mean() == pytest.approx(TEMPERATURE, rel=1e-12)


def test_concentration_rules_for_tiny_clusters_clipping_and_scale() -> None:
    """Singleton and empty clusters take the largest phi; the extremes are clipped to the 10th and
    90th percentiles; the mean becomes the temperature."""
    rng = np.random.default_rng(0)
    sizes = [2, 3, 5, 8, 13, 21, 1, 0, 4, 6, 9, 30]  # cluster 6 a singleton, cluster 7 empty
    k = len(sizes)
    assignments = np.repeat(np.arange(k), sizes)
    spread = rng.uniform(0.1, 3.0, size=k)  # a different spread per cluster
    sq_dist = (spread[assignments] * rng.uniform(0.5, 1.5, size=len(assignments))) ** 2
    phi = concentration(sq_dist, assignments, k, TEMPERATURE)
    np.testing.assert_allclose(phi, _reference_phi(sq_dist, assignments, k, TEMPERATURE), rtol=1e-12)
    assert phi.mean() == pytest.approx(TEMPERATURE, rel=1e-12)
    assert phi[6] == phi[7] == phi.max()  # the tiny clusters: the (clipped) maximum
    # 12 values: the 10th percentile lies between the 2nd and 3rd smallest, so the 2 smallest rise to it
    assert np.sum(phi == phi.min()) == 2
    raw = np.array([np.sqrt(sq_dist[assignments == c]).mean() / np.log(s + 10) if s > 1 else np.nan
                    for c, s in enumerate(sizes)])
    order = np.argsort(raw[~np.isnan(raw)])  # below the clip, phi keeps the raw order
    assert np.all(np.diff(phi[~np.isnan(raw)][order]) >= 0)


# ---------------------------------------------------------------------------- PCL
def test_pcl_clusterings_one_independent_level_per_count() -> None:
    features, counts, seed = _features(), [30, 15, 6], 5
    levels = pcl_clusterings(features, counts, TEMPERATURE, seed=seed, use_gpu=False)
    assert len(levels) == len(counts)
    x = features.numpy()
    for m, (level, k) in enumerate(zip(levels, counts)):
        assert isinstance(level, Clustering) and level.parents is None
        assert level.centroids.shape == (k, DIM) and level.centroids.dtype == torch.float32
        assert level.assignments.shape == (N,) and level.assignments.dtype == torch.int64
        assert level.density.shape == (k,) and level.density.dtype == torch.float32
        torch.testing.assert_close(level.centroids.norm(dim=1), torch.ones(k))
        assert float(level.density.mean()) == pytest.approx(TEMPERATURE, rel=1e-5)
        raw, assignments, sq_dist = kmeans(x, k, seed=seed + m, use_gpu=False)  # the official seed offset
        np.testing.assert_array_equal(level.assignments.numpy(), assignments)
        torch.testing.assert_close(level.centroids, F.normalize(torch.from_numpy(raw), dim=1))
        np.testing.assert_allclose(level.density.numpy(), _reference_phi(sq_dist, assignments, k, TEMPERATURE),
                                   rtol=1e-5)
    again = pcl_clusterings(features, counts, TEMPERATURE, seed=seed, use_gpu=False)
    for a, b in zip(levels, again):
        assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
        assert torch.equal(a.density, b.density)


# ---------------------------------------------------------------------------- HCSC
def test_hierarchical_levels_cluster_the_centroids_below_and_compose() -> None:
    features, counts, seed = _features(), [40, 12, 4], 2
    levels = hierarchical_clusterings(features, counts, TEMPERATURE, seed=seed, use_gpu=False)
    assert len(levels) == 3 and levels[-1].parents is None
    (flat,) = pcl_clusterings(features, counts[:1], TEMPERATURE, seed=seed, use_gpu=False)
    assert torch.equal(levels[0].assignments, flat.assignments) and torch.equal(levels[0].centroids, flat.centroids)
    for level, (lower, upper, k) in enumerate(zip(levels, levels[1:], counts[1:]), start=1):
        assert upper.centroids.shape == (k, DIM) and upper.assignments.shape == (N,)
        assert lower.parents is not None and lower.parents.shape == (len(lower.centroids),)
        assert lower.parents.dtype == torch.int64 and 0 <= int(lower.parents.min()) and int(lower.parents.max()) < k
        torch.testing.assert_close(upper.centroids.norm(dim=1), torch.ones(k))
        # each sample's upper cluster is the parent of its lower cluster
        np.testing.assert_array_equal(upper.assignments.numpy(), lower.parents.numpy()[lower.assignments.numpy()])
        # the parents are a k-means of the lower level's normalised centroids ...
        points = lower.centroids.numpy()
        raw, parents, _ = kmeans(points, k, seed=seed + level, use_gpu=False)
        np.testing.assert_array_equal(lower.parents.numpy(), parents)
        _assert_nearest(points, raw, lower.parents.numpy())
        torch.testing.assert_close(upper.centroids, F.normalize(torch.from_numpy(raw), dim=1))
        # ... and the upper phi comes from the centroid-to-centroid distances
        d2 = _sq_dists(points, raw)[np.arange(len(points)), lower.parents.numpy()]
        np.testing.assert_allclose(upper.density.numpy(), _reference_phi(d2, lower.parents.numpy(), k, TEMPERATURE),
                                   rtol=1e-4)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda: kmeans(np.zeros((5, 3), np.float32), 6, 0), r"in \[1, 5\]"),
    (lambda: kmeans(np.zeros((5, 3), np.float32), 0, 0), r"in \[1, 5\]"),
    (lambda: kmeans(np.zeros(5, np.float32), 2, 0), "non-empty"),
    (lambda: kmeans(np.full((5, 3), np.nan, np.float32), 2, 0), "non-finite"),
    (lambda: kmeans(np.zeros((5, 3), np.float32), 2, 0, niter=0), "niter"),
    (lambda: pcl_clusterings(_features(50), [], TEMPERATURE, 0), "num_clusters is empty"),
    (lambda: pcl_clusterings(_features(50), [51], TEMPERATURE, 0), r"in \[1, 50\]"),
    (lambda: pcl_clusterings(_features(50).index_fill(0, torch.tensor([3]), float("inf")), [4], TEMPERATURE, 0),
     "non-finite"),
    (lambda: pcl_clusterings(_features(50), [4], 0.0, 0), "temperature"),
    (lambda: hierarchical_clusterings(_features(50), [5, 8], TEMPERATURE, 0), "must not increase"),
    (lambda: concentration(np.ones(4), np.array([0, 1, 2, 3]), 4, TEMPERATURE), "no cluster has more than one"),
    (lambda: concentration(np.zeros(4), np.array([0, 0, 1, 1]), 2, TEMPERATURE), "zero spread"),
    (lambda: concentration(np.ones(4), np.array([0, 0, 1, 5]), 2, TEMPERATURE), r"in \[0, 2\)"),
    (lambda: concentration(np.ones(3), np.array([0, 0, 1, 1]), 2, TEMPERATURE), r"\(n,\) alike"),
])
def test_bad_inputs_get_clear_errors(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_gpu_requested_without_gpu_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(ValueError, match="sees no GPU"):
        kmeans(_features(50).numpy(), 4, 0, use_gpu=True)


# ---------------------------------------------------------------------------- sharing
HIERARCHY = [12, 5]


def _compute_counting(calls: list[int]) -> Callable[[], list[Clustering]]:
    def compute() -> list[Clustering]:
        calls.append(distributed.rank())
        return hierarchical_clusterings(_features(), HIERARCHY, TEMPERATURE, seed=3, use_gpu=False)
    return compute


def _broken() -> list[Clustering]:
    raise ValueError("faiss ran out of memory")


def _share_and_fail() -> dict:
    calls: list[int] = []
    levels, seconds = shared_clusterings(_compute_counting(calls))
    with pytest.raises((ValueError, RuntimeError)) as failure:
        shared_clusterings(_broken)
    return {"levels": levels, "seconds": seconds, "calls": calls, "error": f"{failure.type.__name__}: {failure.value}"}


def _share_on_emulated_device() -> dict:
    calls: list[int] = []
    with emulated_device.emulated_device():
        levels, seconds = shared_clusterings(_compute_counting(calls))
        on_host = [not on_device(t) for c in levels for t in (c.centroids, c.assignments, c.density)]
    return {"levels": levels, "seconds": seconds, "calls": calls, "on_host": on_host,
            "checked": dict(emulated_device.CHECKED)}


def _assert_same_levels(a: list[Clustering], b: list[Clustering]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("centroids", "assignments", "density", "parents"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert u.dtype == v.dtype and torch.equal(u, v), name


def test_shared_clusterings_rank_zero_computes_every_rank_receives() -> None:
    ranks = run_ranks(_share_and_fail, 2)
    assert [r["calls"] for r in ranks] == [[0], []]  # computed once, on rank 0
    expected = hierarchical_clusterings(_features(), HIERARCHY, TEMPERATURE, seed=3, use_gpu=False)
    _assert_same_levels(ranks[0]["levels"], expected)
    _assert_same_levels(ranks[1]["levels"], ranks[0]["levels"])
    assert ranks[1]["levels"][0].parents is not None and ranks[1]["levels"][1].parents is None
    assert ranks[0]["seconds"] == ranks[1]["seconds"] > 0
    assert ranks[0]["error"] == "ValueError: faiss ran out of memory"  # rank 0's own error ...
    assert ranks[1]["error"].startswith("RuntimeError: shared_clusterings: the clustering failed on rank 0")


def test_shared_clusterings_uses_device_tensors_only() -> None:
    """Under NCCL's rule (emulated): every tensor crosses by a checked broadcast, none pickled."""
    ranks = run_ranks(_share_on_emulated_device, 2)
    assert [r["calls"] for r in ranks] == [[0], []]
    _assert_same_levels(ranks[1]["levels"], ranks[0]["levels"])
    assert all(all(r["on_host"]) for r in ranks)  # handed back on the host, where faiss and the method read them
    # the level count, the shape table and the time, then 3 tensors a level plus the parents below the top
    sent = 3 + 3 * len(HIERARCHY) + len(HIERARCHY) - 1
    assert [r["checked"] for r in ranks] == [{"broadcast": sent}] * 2


def test_shared_clusterings_on_one_process_just_computes() -> None:
    calls: list[int] = []
    levels, seconds = shared_clusterings(_compute_counting(calls))
    assert calls == [0] and seconds > 0
    _assert_same_levels(levels, hierarchical_clusterings(_features(), HIERARCHY, TEMPERATURE, seed=3, use_gpu=False))
