"""What PCL and HCSC share: MoCo v2 plus clusters of the whole training set, recomputed before
every epoch from `method.clustering_starts_epoch` on.

    v = momentum encoder(centre crop of every training image)   # the trainer's whole-dataset pass
    clusterings = k-means(v) on rank 0 (faiss), sent to every rank  # `cluster`, the method's own

The result (centroids, each sample's cluster, concentrations) is checkpointed through
`get_extra_state`, since its size is the dataset's: a run resumed inside an epoch continues with
that epoch's clusters. Random draws of the losses (negative prototypes, selections) use a
generator seeded by (train.seed, step), the same on every rank (`step_generator`), so N ranks equal one.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, List

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.clustering import Clustering, shared_clusterings
from sslforge.eval.features import DatasetFeatures
from sslforge.methods.moco_v2 import MoCoV2, MoCoV2Config

_CLUSTERING_FIELDS = ("centroids", "assignments", "density", "parents")


@dataclass
class ClusteredMoCoConfig(MoCoV2Config):
    queue_size: int = 16384  # PCL's `--pcl-r`, HCSC's `queue_length`
    num_clusters: List[int] = field(default_factory=lambda: [25000, 50000, 100000])
    clustering_starts_epoch: int = 20  # `--warmup-epoch`: InfoNCE alone before it


class ClusteredMoCo(MoCoV2):
    """Subclasses say how to cluster (`cluster`) and how the loss uses the clusters."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        m = cfg.method
        if not m.num_clusters or min(m.num_clusters) < 1:
            raise ValueError(f"method.num_clusters must be a non-empty list of positive counts, got {m.num_clusters}")
        if m.clustering_starts_epoch < 0:
            raise ValueError(f"method.clustering_starts_epoch must be >= 0, got {m.clustering_starts_epoch}")
        if m.hard_negatives:
            raise ValueError(f"method.hard_negatives applies to moco_v2's InfoNCE, not to {m.name}'s losses")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.clusterings: list[Clustering] = []  # assignments indexed by sample index, -1 for unseen

    @abstractmethod
    def cluster(self, features: torch.Tensor) -> list[Clustering]:
        """The method's clusterings of the (n, d) features (runs on rank 0 only)."""

    def epoch_features_encoder(self, epoch: int) -> nn.Module | None:
        """The momentum encoder (backbone + head), as the official `is_eval` forward."""
        if epoch < self.cfg.method.clustering_starts_epoch:
            return None
        return nn.Sequential(self.momentum_backbone, self.momentum_projector)

    def on_epoch_start(self, epoch: int, features: DatasetFeatures | None) -> dict[str, float]:
        if features is None:
            return {}
        clusterings, seconds = shared_clusterings(lambda: self.cluster(features.features))
        size = int(features.index.max()) + 1 if len(features.index) else 0
        self.clusterings = [_by_sample_index(c, features.index, size) for c in clusterings]
        return {"clustering_s": seconds}

    def cluster_ids(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Each clustering's cluster of the batch's samples (by their sample index)."""
        ids = []
        for c in self.clusterings:
            assignments = c.assignments.to(index.device)
            if int(index.max()) >= len(assignments) or (assignments[index] < 0).any():
                raise RuntimeError("a training sample was not in the epoch's clustering pass: the "
                                   "training shards changed since the epoch started")
            ids.append(assignments[index])
        return ids

    def get_extra_state(self) -> dict[str, Any]:
        return {"clusterings": [{name: getattr(c, name) for name in _CLUSTERING_FIELDS}
                                for c in self.clusterings]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.clusterings = [Clustering(**c) for c in state["clusterings"]]


def _by_sample_index(c: Clustering, index: torch.Tensor, size: int) -> Clustering:
    """`c` with its assignments (one per extracted row) spread over sample indices, -1 where no
    row was extracted (a corrupt sample)."""
    assignments = torch.full((size,), -1, dtype=torch.long)
    assignments[index] = c.assignments
    return Clustering(c.centroids, assignments, c.density, c.parents)
