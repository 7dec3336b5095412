"""Weighted k-nearest-neighbour evaluation (Wu et al. 2018, as in DINO): k=20, T=0.07, cosine.

Features are extracted on every rank (each sees a disjoint part of the shards), kept in host
memory, gathered (through the rank's device, as NCCL needs), and classified on rank 0 with a
faiss inner-product index over L2-normalised features; each neighbour votes for its class with
weight exp(similarity / T).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.launcher.env import DistEnv


@torch.no_grad()
def extract_features(encoder: nn.Module, shards_spec: str, image_size: int, batch_size: int,
                     env: DistEnv, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every sample exactly once, ordered by sample index, on all ranks."""
    from sslforge.data_pipeline.shards import expand_shards
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.views import build_eval_transform

    was_training = encoder.training
    encoder.eval()
    feats, labels, indices = [], [], []
    for batch in eval_batches(expand_shards(shards_spec), build_eval_transform(image_size), batch_size,
                              env.rank, env.world_size, num_workers):
        feats.append(F.normalize(encoder(batch["image"].to(env.device)).float(), dim=1).cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    encoder.train(was_training)
    dim = _feature_dim(encoder, feats, image_size, env.device)
    local = (torch.cat(feats) if feats else torch.zeros(0, dim),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
             torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long))
    all_feats, all_labels, all_idx = (distributed.gather_uneven(t) for t in local)
    order = torch.argsort(all_idx)
    if len(torch.unique(all_idx)) != len(all_idx):
        raise RuntimeError("kNN feature extraction saw a sample twice")
    return all_feats[order], all_labels[order]


def _feature_dim(encoder: nn.Module, feats: list[torch.Tensor], image_size: int, device: torch.device) -> int:
    if feats:
        return feats[0].shape[1]
    with torch.no_grad():  # a rank with no samples still needs the shape for the gather
        was_training = encoder.training
        encoder.eval()
        dim = encoder(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
        encoder.train(was_training)
        return dim


def weighted_knn(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of similarity-weighted kNN votes; features must be L2-normalised."""
    if len(train_feats) == 0 or len(val_feats) == 0:
        raise ValueError("kNN needs a non-empty train bank and val set")
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise ValueError("kNN needs labelled shards (KEY.cls) for both the bank and the val set")
    k = min(k, len(train_feats))
    index = faiss.IndexFlatIP(train_feats.shape[1])
    index.add(np.ascontiguousarray(train_feats.numpy(), dtype=np.float32))
    sims, nbrs = index.search(np.ascontiguousarray(val_feats.numpy(), dtype=np.float32), k)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    weights = torch.from_numpy(sims).div(temperature).exp()
    votes = torch.zeros(len(val_feats), num_classes)
    votes.scatter_add_(1, train_labels[torch.from_numpy(nbrs)], weights)
    return float((votes.argmax(1) == val_labels).float().mean() * 100)


def knn_top1(encoder: nn.Module, cfg: DictConfig, env: DistEnv) -> float:
    """kNN top-1 with the labelled bank `data.knn_train` (or `data.train`) and `data.val`."""
    bank = cfg.data.knn_train or cfg.data.train
    args = (cfg.data.image_size, cfg.eval.batch_size, env, cfg.data.num_workers)
    train_feats, train_labels = extract_features(encoder, bank, *args)
    val_feats, val_labels = extract_features(encoder, cfg.data.val, *args)
    top1 = 0.0
    if env.is_main:
        top1 = weighted_knn(train_feats, train_labels, val_feats, val_labels, cfg.eval.knn_k,
                            cfg.eval.knn_temperature)
    return distributed.sum_over_ranks(top1)  # the others add 0: every rank returns rank 0's value
