"""Features of every sample of a shard set, extracted by all ranks in parallel.

Used by the kNN evaluation (the labelled bank and the val set) and by the trainer's whole-dataset
pass at the start of an epoch (PCL's and HCSC's clustering). Each rank reads a contiguous,
unpadded share of the samples (`eval_batches`), so no sample is seen twice (a DistributedSampler
would pad with duplicates); the shares are gathered through the rank's device in chunks and put
in the order of the stable sample index that training batches carry as `index`.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge import distributed
from sslforge.launcher.env import DistEnv


@dataclass
class DatasetFeatures:
    """Every readable sample's feature (L2-normalised unless asked otherwise), label (-1 when unlabelled) and global
    sample index, sorted by index; the same on every rank. A corrupt sample is absent."""

    features: torch.Tensor  # (n, d) float32
    labels: torch.Tensor  # (n,) int64
    index: torch.Tensor  # (n,) int64, strictly increasing


@torch.no_grad()
def extract_features(encoder: nn.Module, shards_spec: str, image_size: int, batch_size: int,
                     env: DistEnv, num_workers: int, normalize: bool = True) -> DatasetFeatures:
    """Every sample's feature exactly once over all ranks (eval transform, encoder in eval mode,
    its train/eval mode restored after), gathered onto every rank in index order; L2-normalised
    (kNN, clustering) unless `normalize` is False (the linear probe's inputs)."""
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.shards import expand_shards
    from sslforge.data_pipeline.views import build_eval_transform

    encoder = with_rank0_buffers(encoder)
    was_training = encoder.training
    encoder.eval()
    feats, labels, indices = [], [], []
    for batch in eval_batches(expand_shards(shards_spec), build_eval_transform(image_size), batch_size,
                              env.rank, env.world_size, num_workers):
        out = encoder(batch["image"].to(env.device)).float()
        feats.append((F.normalize(out, dim=1) if normalize else out).cpu())
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
        raise RuntimeError(f"feature extraction of {shards_spec} saw a sample twice")
    return DatasetFeatures(all_feats[order], all_labels[order], all_idx[order])


def with_rank0_buffers(encoder: nn.Module) -> nn.Module:
    """The encoder, or on several ranks a copy holding rank 0's buffers: per-rank batch norm
    (MoCo's shuffle BN) leaves each rank its own running statistics, and every sample must be
    encoded by the same network whichever rank reads it (DDP broadcasts rank 0's buffers too)."""
    buffers = list(encoder.buffers())
    if not distributed.is_distributed() or not buffers:
        return encoder
    copy = deepcopy(encoder)
    for buffer in copy.buffers():
        buffer.copy_(distributed.broadcast(buffer.to(distributed.comm_device()), src=0))
    return copy


def _feature_dim(encoder: nn.Module, feats: list[torch.Tensor], image_size: int, device: torch.device) -> int:
    if feats:
        return feats[0].shape[1]
    with torch.no_grad():  # a rank with no samples still needs the shape for the gather
        was_training = encoder.training
        encoder.eval()
        dim = encoder(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
        encoder.train(was_training)
        return dim
