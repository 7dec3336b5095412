"""PCL (Li, Zhou, Xiong & Hoi, 2021): prototypical contrastive learning, MoCo v2 whose queries
must also find the prototype of their cluster, found by k-means over the whole training set.

    every epoch from `clustering_starts_epoch` on:
        v = momentum encoder(centre crop of every training image)       # trainer's whole-dataset pass
        for each cluster count k_m:  c_m, assignment_m, phi_m = k-means(v, k_m)   # rank 0, faiss
    per step (MoCo v2, one direction):
        loss = InfoNCE(q, k, queue) + mean_m ProtoNCE(q, c_m[assignment_m(x)], phi_m)

ProtoNCE (`losses.proto_nce`) contrasts a query with the prototypes of the global batch's
samples and sampled negative prototypes, each scaled by its cluster's concentration phi; the
clustering pass, its checkpointing and the shared random stream are `methods.clustered`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sslforge.clustering import Clustering, pcl_clusterings
from sslforge.losses import info_nce, proto_nce
from sslforge.methods.clustered import ClusteredMoCo, ClusteredMoCoConfig


@dataclass
class PCLConfig(ClusteredMoCoConfig):
    name: str = "pcl"
    negative_prototypes: int = 16384  # `--pcl-r`, as the queue


class PCL(ClusteredMoCo):
    config_class = PCLConfig

    def cluster(self, features: torch.Tensor) -> list[Clustering]:
        m = self.cfg.method
        return pcl_clusterings(features, list(m.num_clusters), m.temperature, self.cfg.train.seed)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        h, q, k = self.query_and_key(*batch["views"][:2])
        loss_instance = info_nce(q, k, self.temperature, self.queue)
        out = {"embedding": h.detach(), "loss_instance": loss_instance.detach()}
        if not self.clusterings:
            return {"loss": loss_instance, **out}
        generator = self.step_generator(step, q.device)
        protos = [proto_nce(q, ids, c.centroids.to(q.device), c.density.to(q.device),
                            self.cfg.method.negative_prototypes, generator)
                  for ids, c in zip(self.cluster_ids(batch["index"].to(q.device)), self.clusterings)]
        loss_proto = torch.stack(protos).mean()
        return {"loss": loss_instance + loss_proto, "loss_proto": loss_proto.detach(), **out}
