"""Prototype losses of PCL and HCSC, distributed-aware.

The whole training set is clustered elsewhere, once an epoch; these functions take the result as
tensors: `centroids` (k, d) L2-normalised, `density` (k,) the concentration phi of each cluster
(its temperature), the cluster of each of this rank's samples and, for HCSC's hierarchy,
`parents` (k_l,): the level-(l+1) cluster of each level-l cluster.

- PCL (Li et al., 2021): `proto_nce`, each query against its cluster's prototype among
  prototypes of other clusters, one call per clustering (the method averages them).
- HCSC (Guo et al., 2022): `hcsc_instance_masks` + `hcsc_instance_nce`, MoCo's InfoNCE per level
  with the queue items probably in the query's cluster dropped; `hcsc_proto_nce` (drawing
  `hcsc_prototype_masks`), ProtoNCE per level with the negatives probably under the positive's
  parent dropped.

N ranks with b samples each give the loss and gradients of one rank with B = N*b: cluster ids
cross ranks (no gradient; centroids and density are the same everywhere), and every random draw
comes from a generator the caller seeds identically on every rank and covers the global batch:
a (B, n) table of uniforms of which rank r keeps rows r*b .. r*b+b-1 (`shared_random`). A
Bernoulli(p) draw is `u < p`: the distribution of the official `torch.distributions.Bernoulli`,
from the shared generator. Every rank must hold the same b.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.info_nce import info_nce
from sslforge.losses.precision import float32_loss
from sslforge.losses.shared_random import shared_uniforms

INSTANCE_DENSITY_MIN = 1e-3  # official instance selection clamps phi from below
INSTANCE_KEEP_MAX = 0.999  # official clamp of the instance keep probability: (0, 0.999)
PROTOTYPE_KEEP_RANGE = (1e-4, 0.999)  # official clamp of the prototype keep probability
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ----------------------------------------------------------------------------- checks


def _check_ids(name: str, ids: torch.Tensor, count: int, what: str) -> None:
    if ids.ndim != 1 or ids.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name}: {what} must be a 1-d integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= count):
        raise ValueError(f"{name}: {what} must lie in [0, {count}), got [{int(ids.min())}, {int(ids.max())}]")


def _check_queries(name: str, q: torch.Tensor, ids: torch.Tensor) -> None:
    if q.ndim != 2 or len(q) == 0:
        raise ValueError(f"{name}: q must be (b, d) with b >= 1, got {tuple(q.shape)}")
    if ids.shape != (len(q),):
        raise ValueError(f"{name}: cluster_ids must be ({len(q)},), one per query, got {tuple(ids.shape)}")


def _check_clustering(name: str, dim: int, centroids: torch.Tensor, density: torch.Tensor) -> None:
    if centroids.ndim != 2 or centroids.shape[1] != dim or len(centroids) == 0:
        raise ValueError(f"{name}: centroids must be (k, {dim}) with k >= 1, got {tuple(centroids.shape)}")
    if density.shape != (len(centroids),):
        raise ValueError(f"{name}: density must be ({len(centroids)},), one per centroid, "
                         f"got {tuple(density.shape)}")
    if not bool((density > 0).all()):
        raise ValueError(f"{name}: density (phi) must be > 0 everywhere, got min {float(density.min())}")


def _check_hierarchy(name: str, dim: int | None, cluster_ids: torch.Tensor, parents: Sequence[torch.Tensor],
                     centroids: Sequence[torch.Tensor], density: Sequence[torch.Tensor]) -> None:
    """L levels of clusters, their parents, and this rank's b >= 1 level-0 ids; `dim` None: any
    feature size the levels share."""
    if len(centroids) == 0 or len(density) != len(centroids) or len(parents) != len(centroids) - 1:
        raise ValueError(f"{name}: need L >= 1 levels of centroids and density and L-1 parents, got "
                         f"{len(centroids)}, {len(density)} and {len(parents)}")
    dim = centroids[0].shape[-1] if dim is None else dim
    for level, (c, d) in enumerate(zip(centroids, density)):
        _check_clustering(f"{name} (level {level})", dim, c, d)
    _check_ids(name, cluster_ids, len(centroids[0]), "cluster_ids")
    if len(cluster_ids) == 0:
        raise ValueError(f"{name}: cluster_ids must hold this rank's b >= 1 samples")
    for level, up in enumerate(parents):
        if up.shape != (len(centroids[level]),):
            raise ValueError(f"{name}: parents[{level}] must be ({len(centroids[level])},), one per "
                             f"level-{level} cluster, got {tuple(up.shape)}")
        _check_ids(name, up, len(centroids[level + 1]), f"parents[{level}]")


def _check_temperature(name: str, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


# ----------------------------------------------------------------------------- shared pieces


def _global_ids(ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ids, rank order, on `ids`' device (no gradient)."""
    return distributed.all_gather(ids.to(distributed.comm_device())).to(ids.device)


def _levels(ids: torch.Tensor, parents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each sample's cluster at every level: level l+1 is the parent of level l."""
    out = [ids]
    for up in parents:
        out.append(up.to(ids.device)[out[-1]])
    return out


def _free_clusters(positives: torch.Tensor, count: int) -> torch.Tensor:
    """The clusters, ascending, that are no sample's positive."""
    free = torch.ones(count, dtype=torch.bool, device=positives.device)
    free[positives] = False
    return free.nonzero().squeeze(1)


# ----------------------------------------------------------------------------- PCL


@float32_loss
def proto_nce(q: torch.Tensor, cluster_ids: torch.Tensor, centroids: torch.Tensor, density: torch.Tensor,
              num_negatives: int, generator: torch.Generator) -> torch.Tensor:
    """PCL's ProtoNCE for one clustering: mean over this rank's queries of

        -log( exp(q_i.c_{y_i} / phi_{y_i}) / sum_{j in P + N} exp(q_i.c_j / phi_j) )

    P: the prototypes of the global batch's B samples in rank order, duplicates kept (query i of
    rank r owns column r*b + i); N: `num_negatives` clusters drawn without replacement by
    `generator` among those in no sample's P (all of them when fewer remain).

    q: (b, d) this rank's queries (gradient flows), L2-normalised here; cluster_ids: (b,) their
    clusters; centroids: (k, d) L2-normalised; density: (k,) phi > 0; generator: seeded
    identically on every rank.

    Unlike salesforce/PCL: P and the exclusion cover the global batch, where the official code
    uses each GPU's own batch (so its loss changes with the number of GPUs; here N ranks equal
    one); candidates are all k clusters, where the official code enumerates
    `range(im2cluster.max())` (af7287d, the release's main_pcl.py), so the highest cluster id is
    never a negative (964da1f enumerates up to the highest assigned id); fewer candidates than
    `num_negatives` use them all, where `random.sample` fails.
    """
    name = "proto_nce"
    _check_queries(name, q, cluster_ids)
    _check_clustering(name, q.shape[1], centroids, density)
    _check_ids(name, cluster_ids, len(centroids), "cluster_ids")
    if num_negatives < 0:
        raise ValueError(f"{name}: num_negatives must be >= 0, got {num_negatives}")
    positives = _global_ids(cluster_ids)  # (B,)
    candidates = _free_clusters(positives, len(centroids))
    draw = torch.randperm(len(candidates), generator=generator, device=generator.device)[:num_negatives]
    columns = torch.cat([positives, candidates[draw.to(candidates.device)]])
    q = F.normalize(q, dim=1)
    logits = q @ centroids.detach()[columns].T / density.detach()[columns]
    targets = torch.arange(len(q), device=q.device) + distributed.rank() * len(q)
    return F.cross_entropy(logits, targets)


# ----------------------------------------------------------------------------- HCSC


@float32_loss
@torch.no_grad()
def hcsc_instance_masks(queue: torch.Tensor, cluster_ids: torch.Tensor, parents: Sequence[torch.Tensor],
                        centroids: Sequence[torch.Tensor], density: Sequence[torch.Tensor],
                        generator: torch.Generator) -> list[torch.Tensor]:
    """HCSC's instance selection: which queue items each query keeps as negatives, per level.

    A queue item n_j likely in query i's cluster y_i is likely a false negative; it is kept with

        p_ij = clamp(1 - softmax_c(n_j.c / max(phi_c, 1e-3))[y_i], 0, 0.999)

    queue: (K, d) MoCo's normalised keys, the same on every rank; cluster_ids: (b,) this rank's
    clusters at level 0; parents, centroids, density: the hierarchy (see the module docstring).
    Returns one (b, K) bool mask per level, True = kept; reuse them for the local crops.
    """
    name = "hcsc_instance_masks"
    if queue.ndim != 2 or len(queue) == 0:
        raise ValueError(f"{name}: queue must be (K, d) with K >= 1, got {tuple(queue.shape)}")
    _check_hierarchy(name, queue.shape[1], cluster_ids, parents, centroids, density)
    masks = []
    for ids, c, phi in zip(_levels(cluster_ids, parents), centroids, density):
        affinity = torch.softmax(queue @ c.T / phi.clamp(min=INSTANCE_DENSITY_MIN), dim=1)  # (K, k_l)
        keep = (1 - affinity[:, ids].T).clamp(0.0, INSTANCE_KEEP_MAX)  # (b, K)
        masks.append(shared_uniforms(len(ids), len(queue), generator, keep.device) < keep)
    return masks


@float32_loss
def hcsc_instance_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                      keep_masks: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """HCSC's hierarchical InfoNCE: MoCo's InfoNCE once per level, summed over levels,

        sum_l mean_i -log( e^{q_i.k_i/T} / (e^{q_i.k_i/T} + sum_j e^{m_lij * q_i.n_j / T}) )

    A dropped negative (m = 0) keeps logit 0: the official code multiplies the logit by the mask,
    so it still adds e^0 = 1 to the denominator.

    q: (b, d) queries (gradient flows), k: (b, d) keys (detached), both L2-normalised here;
    queue: (K, d) normalised keys; keep_masks: `hcsc_instance_masks`; temperature: MoCo's T.
    """
    if len(keep_masks) == 0:
        raise ValueError("hcsc_instance_nce: keep_masks must hold one mask per level, got none")
    return torch.stack([info_nce(q, k, temperature, queue, keep=m) for m in keep_masks]).sum()


@float32_loss
@torch.no_grad()
def hcsc_prototype_masks(cluster_ids: torch.Tensor, parents: Sequence[torch.Tensor],
                         centroids: Sequence[torch.Tensor], density: Sequence[torch.Tensor],
                         temperature: float, generator: torch.Generator
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """HCSC's prototype selection: the negative prototypes of each level, and which each query keeps.

    Negatives of level l: every cluster that is no positive of the global batch at that level.
    Below the top, negative n is kept for query i with

        p_in = clamp(1 - softmax_u(c_n.c_u / phi'_u)[parent(y_i)], 1e-4, 0.999),
        phi' = T * phi_{l+1} / mean(phi_{l+1})

    (u runs over level l+1): a negative under the positive's parent is probably a false one.
    The top level keeps every negative. Arguments as `hcsc_proto_nce`.
    Returns (negatives, masks): per level the (n_l,) ids ascending; per level below the top the
    (b, n_l) bool mask, True = kept.
    """
    name = "hcsc_prototype_masks"
    _check_hierarchy(name, None, cluster_ids, parents, centroids, density)
    _check_temperature(name, temperature)
    return _prototype_masks(cluster_ids, parents, centroids, density, temperature, generator)


def _prototype_masks(cluster_ids: torch.Tensor, parents: Sequence[torch.Tensor],
                     centroids: Sequence[torch.Tensor], density: Sequence[torch.Tensor], temperature: float,
                     generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`hcsc_prototype_masks` on checked float32 inputs."""
    local = _levels(cluster_ids, parents)
    positives = _levels(_global_ids(cluster_ids), parents)
    negatives = [_free_clusters(ids, len(c)) for ids, c in zip(positives, centroids)]
    masks = []
    for level in range(len(centroids) - 1):
        phi_up = density[level + 1]
        scaled_phi = phi_up / phi_up.mean() * temperature
        affinity = torch.softmax(centroids[level] @ centroids[level + 1].T / scaled_phi, dim=1)  # (k_l, k_l+1)
        keep = (1 - affinity[negatives[level]][:, local[level + 1]].T).clamp(*PROTOTYPE_KEEP_RANGE)  # (b, n_l)
        masks.append(shared_uniforms(len(cluster_ids), len(negatives[level]), generator, keep.device) < keep)
    return negatives, masks


@float32_loss
def hcsc_proto_nce(q: torch.Tensor, cluster_ids: torch.Tensor, parents: Sequence[torch.Tensor],
                   centroids: Sequence[torch.Tensor], density: Sequence[torch.Tensor],
                   temperature: float, generator: torch.Generator) -> torch.Tensor:
    """HCSC's hierarchical ProtoNCE with prototype selection, averaged over levels:

        mean_l mean_i -log( e^{q_i.c_{y_i}/phi_{y_i}} /
                            (e^{q_i.c_{y_i}/phi_{y_i}} + sum_n e^{m_lin * q_i.c_n / phi_n}) )

    y_i: query i's cluster at level l (positive at index 0); n: the level's negatives and m their
    masks (`hcsc_prototype_masks`; all 1 at the top); a dropped negative keeps logit 0, as in
    the official code, which multiplies the logit by the mask.

    q: (b, d) this rank's queries (gradient flows), L2-normalised here; cluster_ids: (b,) their
    level-0 clusters; parents: L-1 tensors (k_l,), the level-(l+1) cluster of each level-l
    cluster; centroids: L tensors (k_l, d), L2-normalised; density: L tensors (k_l,), phi > 0;
    temperature: MoCo's T, the mean phi of the selection (the official code rescales phi to
    it); generator: seeded identically on every rank (call again for each local crop: the
    official code draws new masks for them).

    Unlike hirl-team/HCSC: negatives exclude the positives of the global batch, not of each GPU's
    batch, so N ranks equal one; candidates are all k_l clusters, where the official code
    enumerates `range(im2cluster.max())` and so never uses the highest cluster id.
    """
    name = "hcsc_proto_nce"
    _check_queries(name, q, cluster_ids)
    _check_hierarchy(name, q.shape[1], cluster_ids, parents, centroids, density)
    _check_temperature(name, temperature)
    with torch.no_grad():
        negatives, masks = _prototype_masks(cluster_ids, parents, centroids, density, temperature, generator)
    q = F.normalize(q, dim=1)
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    losses = []
    for level, (ids, c, phi) in enumerate(zip(_levels(cluster_ids, parents), centroids, density)):
        c, phi, neg = c.detach(), phi.detach(), negatives[level]
        positive = (q * c[ids]).sum(dim=1, keepdim=True) / phi[ids].unsqueeze(1)  # (b, 1)
        negative = q @ c[neg].T  # (b, n_l)
        if level < len(masks):
            negative = negative * masks[level].to(negative)
        losses.append(F.cross_entropy(torch.cat([positive, negative / phi[neg]], dim=1), labels))
    return torch.stack(losses).mean()
