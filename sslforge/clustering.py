"""Whole-dataset clustering for the prototype methods: PCL's k-means levels and HCSC's hierarchy.

PCL (Li et al., 2021), at every epoch after the warm-up, over the features of every training
sample (`salesforce/PCL:main_pcl.py:run_kmeans`):

    for m, k in enumerate(num_clusters):               # 25k, 50k, 100k on ImageNet
        C, assign, d = faiss_kmeans(features, k, seed=m)   # niter 20, nredo 5, on one process
        phi[c] = mean_{i in c} sqrt(d_i) / log(|c| + 10)   # clusters of <= 1 sample: max phi
        phi = clip(phi, p10(phi), p90(phi))
        phi = temperature * phi / mean(phi)
        prototypes = normalise(C)

HCSC (Guo et al., 2022; `gyfastas/HCSC:run_hkmeans`) stacks the levels: level 0 clusters the
features, level l clusters the (normalised) centroids of level l-1. `cluster2cluster` (here the
lower level's `parents`) maps each lower cluster to its cluster above, sample assignments are
composed through it, and an upper level's phi comes from the distances of the lower centroids
to their centroid above, with the same formula.

The clustering runs on one process; `shared_clusterings` hands its result to every rank through
the device-checked collectives of `sslforge.distributed`.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from sslforge import distributed


@dataclass(eq=False)  # tensors have no single truth value: compare fields, not levels
class Clustering:
    """One level of cluster structure over the n training samples."""

    centroids: torch.Tensor  # (k, d) float32, rows L2-normalised (as PCL normalises them)
    assignments: torch.Tensor  # (n,) int64: the cluster of every sample (upper HCSC levels: composed)
    density: torch.Tensor  # (k,) float32: the concentration phi, clipped and rescaled to `temperature`
    parents: torch.Tensor | None = None  # (k,) int64: each cluster's cluster one level up (HCSC); None at the top / PCL


# ------------------------------------------------------------------------------ validation
def _as_points(x: np.ndarray, what: str) -> np.ndarray:
    """C-contiguous float32 (n, d) with finite values: what faiss reads."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: points must be a non-empty (n, d) array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: points contain non-finite values (NaN or inf, or beyond float32)")
    return x


def _check_k(k: int, n: int, what: str) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise ValueError(f"{what}: number of clusters must be an integer in [1, {n}] (the number of points), got {k}")
    return int(k)


def _check_temperature(temperature: float, what: str) -> None:
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{what}: temperature must be a positive number, got {temperature}")


def _features_to_numpy(features: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{what}: features must be a torch.Tensor (n, d), got {type(features).__name__}")
    return _as_points(features.detach().to("cpu", torch.float32).numpy(), what)


def _check_counts(num_clusters: Sequence[int], n: int, what: str) -> list[int]:
    if len(num_clusters) == 0:
        raise ValueError(f"{what}: num_clusters is empty; give at least one cluster count")
    return [_check_k(k, n, what) for k in num_clusters]


# ------------------------------------------------------------------------------ k-means
def _use_gpu(use_gpu: bool | None) -> bool:
    available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu and not available:
        raise ValueError("kmeans: use_gpu=True, but this faiss build sees no GPU (install faiss-gpu, the [gpu] extra)")
    return available if use_gpu is None else bool(use_gpu)


def _flat_l2_index(d: int, gpu: bool) -> tuple[faiss.Index, object]:
    """The exact L2 index k-means assigns with; on GPU, float32 as PCL's (`useFloat16 = False`).
    Returns the GPU resources too: they must outlive the index."""
    if not gpu:
        return faiss.IndexFlatL2(d), None
    resources = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = False
    cfg.device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return faiss.GpuIndexFlatL2(resources, d, cfg), resources


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20, nredo: int = 5,
           max_points_per_centroid: int = 1000, min_points_per_centroid: int = 10,
           use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss k-means as PCL runs it: (centroids (k, d) float32 un-normalised, assignments (n,)
    int64, squared L2 distance of each point to its centroid (n,) float32).

    nredo runs from different seeds keep the lowest objective; the assignments are a final
    search of every point against the kept centroids. use_gpu None: GPU faiss when it sees a GPU.
    """
    x = _as_points(x, "kmeans")
    n, d = x.shape
    k = _check_k(k, n, "kmeans")
    if niter < 1 or nredo < 1:
        raise ValueError(f"kmeans: niter and nredo must be >= 1, got {niter} and {nredo}")
    clus = faiss.Clustering(d, k)
    clus.verbose = False
    clus.niter, clus.nredo, clus.seed = int(niter), int(nredo), int(seed)
    clus.max_points_per_centroid = int(max_points_per_centroid)
    clus.min_points_per_centroid = int(min_points_per_centroid)
    index, _resources = _flat_l2_index(d, _use_gpu(use_gpu))
    clus.train(x, index)  # leaves the kept centroids in the index
    sq_dist, nearest = index.search(x, 1)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return centroids, nearest[:, 0].astype(np.int64), sq_dist[:, 0]


def concentration(sq_dist: np.ndarray, assignments: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """PCL's phi per cluster (float64): mean(sqrt(d)) / log(n + 10) over its n points; clusters
    with <= 1 point (empty ones too) get the largest phi; clipped to the [10th, 90th] percentile
    (numpy's linear interpolation); rescaled so that mean(phi) == temperature.

    Small phi = a tight cluster = a sharper prototype logit. Distances are clamped at 0 before
    the square root (faiss's L2 on GPU can round a zero distance just below it).
    """
    sq_dist, assignments = np.asarray(sq_dist, dtype=np.float64), np.asarray(assignments)
    if sq_dist.ndim != 1 or sq_dist.shape != assignments.shape:
        raise ValueError(f"concentration: sq_dist and assignments must be (n,) alike, got "
                         f"{sq_dist.shape} and {assignments.shape}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"concentration: k must be a positive integer, got {k}")
    in_range = assignments.min(initial=0) >= 0 and assignments.max(initial=0) < k
    if not np.issubdtype(assignments.dtype, np.integer) or not in_range:
        raise ValueError(f"concentration: assignments must be integers in [0, {k})")
    if not np.isfinite(sq_dist).all():
        raise ValueError("concentration: sq_dist contains non-finite values")
    _check_temperature(temperature, "concentration")
    counts = np.bincount(assignments, minlength=k)
    root_sums = np.bincount(assignments, weights=np.sqrt(np.maximum(sq_dist, 0.0)), minlength=k)
    several = counts > 1
    if not several.any():
        raise ValueError(f"concentration: no cluster has more than one point ({len(assignments)} points, "
                         f"{k} clusters): phi is undefined")
    phi = np.zeros(k)
    phi[several] = root_sums[several] / counts[several] / np.log(counts[several] + 10)
    phi[~several] = phi.max()
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    if not phi.mean() > 0:
        raise ValueError("concentration: every cluster has zero spread (identical points: collapsed features?)")
    return temperature * phi / phi.mean()


# ------------------------------------------------------------------------------ levels
def _cluster(points: np.ndarray, k: int, seed: int, temperature: float, use_gpu: bool | None) -> Clustering:
    """One k-means level over `points` (samples, or lower centroids for upper HCSC levels)."""
    centroids, assignments, sq_dist = kmeans(points, k, seed, use_gpu=use_gpu)
    density = concentration(sq_dist, assignments, k, temperature)
    return Clustering(centroids=F.normalize(torch.from_numpy(centroids), dim=1),
                      assignments=torch.from_numpy(assignments),
                      density=torch.from_numpy(density).float())


def pcl_clusterings(features: torch.Tensor, num_clusters: Sequence[int], temperature: float, seed: int,
                    use_gpu: bool | None = None) -> list[Clustering]:
    """PCL: one independent k-means per entry of `num_clusters` over the (n, d) features; the
    m-th runs with seed `seed + m` (the official: seed m)."""
    x = _features_to_numpy(features, "pcl_clusterings")
    counts = _check_counts(num_clusters, len(x), "pcl_clusterings")
    _check_temperature(temperature, "pcl_clusterings")
    return [_cluster(x, k, seed + m, temperature, use_gpu) for m, k in enumerate(counts)]


def hierarchical_clusterings(features: torch.Tensor, num_clusters: Sequence[int], temperature: float, seed: int,
                             use_gpu: bool | None = None) -> list[Clustering]:
    """HCSC: level 0 clusters the features, level l the normalised centroids of level l-1 (seed
    `seed + l`); level l-1's `parents` are those assignments, level l's sample assignments are
    them composed with level l-1's; phi of level l from the lower centroids' distances."""
    x = _features_to_numpy(features, "hierarchical_clusterings")
    counts = _check_counts(num_clusters, len(x), "hierarchical_clusterings")
    if any(upper > lower for lower, upper in itertools.pairwise(counts)):
        raise ValueError(f"hierarchical_clusterings: each level clusters the previous level's centroids, so the "
                         f"cluster counts must not increase, got {counts}")
    _check_temperature(temperature, "hierarchical_clusterings")
    levels: list[Clustering] = []
    for level, k in enumerate(counts):
        points = x if not levels else levels[-1].centroids.numpy()
        current = _cluster(points, k, seed + level, temperature, use_gpu)
        if levels:
            levels[-1].parents = current.assignments
            current.assignments = current.assignments[levels[-1].assignments]
        levels.append(current)
    return levels


# ------------------------------------------------------------------------------ sharing
_FAILED = -1  # sent instead of the level count when the clustering raised on rank 0


def _on_host(levels: list[Clustering]) -> list[Clustering]:
    """The canonical form every rank returns: host tensors of the documented dtypes."""
    if not isinstance(levels, list) or not all(isinstance(c, Clustering) for c in levels):
        raise TypeError("shared_clusterings: compute must return a list of Clustering")
    return [Clustering(centroids=c.centroids.to("cpu", torch.float32).contiguous(),
                       assignments=c.assignments.to("cpu", torch.int64).contiguous(),
                       density=c.density.to("cpu", torch.float32).contiguous(),
                       parents=None if c.parents is None else c.parents.to("cpu", torch.int64).contiguous())
            for c in levels]


def _tensors(c: Clustering) -> list[torch.Tensor]:
    return [c.centroids, c.assignments, c.density] + ([] if c.parents is None else [c.parents])


def _send(levels: list[Clustering] | None, seconds: float) -> None:
    """Rank 0: the level count (or _FAILED), the shapes, the time, then each level's tensors."""
    device = distributed.comm_device()
    distributed.broadcast(torch.tensor([_FAILED if levels is None else len(levels)], device=device))
    if levels is None:
        return
    shapes = [[*c.centroids.shape, len(c.assignments), c.parents is not None] for c in levels]
    distributed.broadcast(torch.tensor(shapes, dtype=torch.int64, device=device).view(-1, 4))
    distributed.broadcast(torch.tensor([seconds], dtype=torch.float64, device=device))
    for c in levels:
        for t in _tensors(c):
            distributed.broadcast(t.to(device))


def _receive() -> tuple[list[Clustering], float]:
    """The other ranks: the mirror of `_send`, into buffers on the communication device."""
    device = distributed.comm_device()

    def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return distributed.broadcast(torch.empty(shape, dtype=dtype, device=device)).cpu()

    count = int(take((1,), torch.int64).item())
    if count == _FAILED:
        raise RuntimeError("shared_clusterings: the clustering failed on rank 0 (its error is in rank 0's log)")
    shapes = take((count, 4), torch.int64).tolist()
    seconds = float(take((1,), torch.float64).item())
    levels = [Clustering(centroids=take((k, d), torch.float32), assignments=take((n,), torch.int64),
                         density=take((k,), torch.float32), parents=take((k,), torch.int64) if has_parents else None)
              for k, d, n, has_parents in shapes]
    return levels, seconds


def shared_clusterings(compute: Callable[[], list[Clustering]]) -> tuple[list[Clustering], float]:
    """Run `compute` on rank 0 only and deliver its result (on the host) to every rank, with the
    seconds rank 0 spent computing (the same value everywhere, to log). Tensors travel by
    broadcast on the communication device, shapes first; if `compute` raises on rank 0, the other
    ranks raise too instead of waiting for tensors that never come."""
    if distributed.rank() != 0:
        return _receive()
    start = time.perf_counter()
    try:
        levels = _on_host(compute())
    except BaseException:
        if distributed.is_distributed():
            _send(None, 0.0)
        raise
    seconds = time.perf_counter() - start
    if distributed.is_distributed():
        _send(levels, seconds)
    return levels, seconds
