"""HCSC (Guo, Xu et al., CVPR 2022): hierarchical contrastive selective coding, MoCo v2 with a
hierarchy of prototypes and negatives chosen to be semantically different from the query.

    every epoch from `clustering_starts_epoch` on (the clustering pass of `methods.clustered`):
        level 0 = k-means(momentum features of every image, 3000); level l = k-means(centroids of l-1)
    per step, query q (crop 0), key k (crop 1), local crops v (crops 2.., multi-crop only):
        for each level l: keep queue item j for query i with probability
            1 - softmax_c(queue_j . c_l / phi_l)[cluster_l(i)]              # instance selection
        L_inst  = sum_l InfoNCE(q, k, queue, kept_l) + sum_{l, v} InfoNCE(v, k, queue, kept_l)
        L_proto = HProtoNCE(q) + sum_v HProtoNCE(v)    # mean over levels; below the top, negative
                                                        # prototypes under the positive's parent are
                                                        # mostly dropped (prototype selection)
        loss = L_inst + L_proto         (before clustering starts: plain InfoNCE on q and every v)

The losses are `losses.hcsc_instance_masks`, `hcsc_instance_nce` and `hcsc_proto_nce`; their
random draws come from the generator every rank seeds alike (`methods.clustered`). Local crops
share the query's instance selection and draw their own prototype selection, as the official code
(its multi-crop configs set `selection_on_local`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch

from sslforge.clustering import Clustering, hierarchical_clusterings
from sslforge.losses import hcsc_instance_masks, hcsc_instance_nce, hcsc_proto_nce, info_nce
from sslforge.methods.clustered import ClusteredMoCo, ClusteredMoCoConfig


@dataclass
class HCSCConfig(ClusteredMoCoConfig):
    name: str = "hcsc"
    num_clusters: List[int] = field(default_factory=lambda: [3000, 2000, 1000])  # level 0 first


class HCSC(ClusteredMoCo):
    config_class = HCSCConfig

    def cluster(self, features: torch.Tensor) -> list[Clustering]:
        m = self.cfg.method
        return hierarchical_clusterings(features, list(m.num_clusters), m.temperature, self.cfg.train.seed)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        crops = batch["views"]
        h, q, k = self.query_and_key(crops[0], crops[1])
        local = [self.projector(self.backbone(x)) for x in crops[2:]]
        out = {"embedding": h.detach()}
        if not self.clusterings:
            return {"loss": torch.stack([info_nce(v, k, self.temperature, self.queue) for v in [q, *local]]).sum(),
                    **out}
        ids = self.cluster_ids(batch["index"].to(q.device))[0]  # level 0; the levels above follow parents
        hierarchy = ([c.parents.to(q.device) for c in self.clusterings[:-1]],
                     [c.centroids.to(q.device) for c in self.clusterings],
                     [c.density.to(q.device) for c in self.clusterings])
        generator = self.step_generator(step, q.device)
        kept = hcsc_instance_masks(self.queue, ids, *hierarchy, generator)
        loss_instance = torch.stack([hcsc_instance_nce(v, k, self.queue, kept, self.temperature)
                                     for v in [q, *local]]).sum()
        loss_proto = torch.stack([hcsc_proto_nce(v, ids, *hierarchy, self.temperature, generator)
                                  for v in [q, *local]]).sum()
        kept_fraction = torch.stack([m.float().mean() for m in kept]).mean()
        return {"loss": loss_instance + loss_proto, "loss_instance": loss_instance.detach(),
                "loss_proto": loss_proto.detach(), "kept_negatives": kept_fraction, **out}
