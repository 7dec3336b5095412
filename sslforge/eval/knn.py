"""Weighted k-nearest-neighbour evaluation (Wu et al. 2018, as in DINO): k=20, T=0.07, cosine.

Features are extracted on every rank (each sees a disjoint part of the shards, `eval.features`),
gathered in host memory, and classified on rank 0 with a
faiss inner-product index over L2-normalised features; each neighbour votes for its class with
weight exp(similarity / T).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.eval import EvalError
from sslforge.eval.features import extract_features
from sslforge.launcher.env import DistEnv


def weighted_knn(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of similarity-weighted kNN votes; features must be L2-normalised."""
    if len(train_feats) == 0 or len(val_feats) == 0:
        raise EvalError("kNN needs a non-empty train bank and val set")
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise EvalError("kNN needs labelled shards (KEY.cls) for both the bank and the val set")
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
    train, val = extract_features(encoder, bank, *args), extract_features(encoder, cfg.data.val, *args)
    top1 = 0.0
    if env.is_main:
        top1 = weighted_knn(train.features, train.labels, val.features, val.labels, cfg.eval.knn_k,
                            cfg.eval.knn_temperature)
    return distributed.sum_over_ranks(top1)  # the others add 0: every rank returns rank 0's value
