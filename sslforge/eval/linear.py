"""The linear probe's data and score (`methods/linear_probe.py`).

Fast path (`method.cache_features`): every training image is encoded once (the evaluation
transform, all ranks in parallel, each image once: `extract_features`) and `FeatureLoader` serves
the head batches of those features in place of the shard stream. Every rank holds all
features (n x d float32: 10 GB for ResNet-50 on ImageNet-1k, 2 GB for ViT-S) and takes its slice
of each global batch of one seeded permutation per epoch, so N ranks train on exactly the
global batches one rank would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.eval import EvalError
from sslforge.eval.features import DatasetFeatures, extract_features
from sslforge.launcher.env import DistEnv


def encode(encoder: nn.Module, shards: str, cfg: DictConfig, env: DistEnv) -> DatasetFeatures:
    """Unnormalised features of every labelled sample of `shards`; an error names a sample
    without a label or with one outside `method.num_classes`."""
    feats = extract_features(encoder, shards, cfg.data.image_size, cfg.eval.batch_size, env,
                             cfg.data.num_workers, normalize=False)
    if len(feats.labels) == 0:
        raise EvalError(f"no readable samples in {shards}")
    if (feats.labels < 0).any():
        raise EvalError(f"the linear probe needs labelled shards (KEY.cls): {shards}")
    if (feats.labels >= cfg.method.num_classes).any():
        raise EvalError(f"{shards}: label {int(feats.labels.max())} is outside method.num_classes="
                        f"{cfg.method.num_classes}")
    return feats


class FeatureLoader:
    """ShardLoader's interface (`len`, `set_epoch`, iteration) over cached features."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, local_batch: int, seed: int, rank: int,
                 world_size: int) -> None:
        self.features, self.labels = features, labels
        self.local_batch, self.seed, self.rank = local_batch, seed, rank
        self.global_batch = local_batch * world_size
        self.steps = len(features) // self.global_batch  # the last partial batch is dropped, as in training
        if self.steps == 0:
            raise EvalError(f"{len(features)} training samples do not fill one global batch of "
                            f"{self.global_batch} (optim.batch_size)")
        self.epoch = self.skip = 0

    @classmethod
    def encode(cls, encoder: nn.Module, cfg: DictConfig, env: DistEnv, local_batch: int) -> "FeatureLoader":
        feats = encode(encoder, cfg.data.train, cfg, env)
        return cls(feats.features, feats.labels, local_batch, cfg.train.seed, env.rank, env.world_size)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch))
        for step in range(self.skip, self.steps):
            start = step * self.global_batch + self.rank * self.local_batch
            index = order[start:start + self.local_batch]
            yield {"views": [self.features[index]], "label": self.labels[index], "index": index, "skipped": 0}


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"val_top1": float((top[:, 0] == labels).float().mean() * 100),
            "val_top5": float((top == labels[:, None]).any(1).float().mean() * 100)}


def score_val(method: Any, context: Any) -> dict[str, float]:
    """`val_top1` / `val_top5` (%) of a `LinearProbe` on `data.val`: from its cached val features
    (encoded at the first evaluation) on the fast path, else by streaming the val images."""
    cfg, env = context.cfg, context.env
    if not cfg.method.cache_features:
        from sslforge.eval.classify import classifier_accuracy

        acc = classifier_accuracy(method.classifier(), cfg.data.val, cfg.data.image_size, cfg.eval.batch_size,
                                  env, cfg.data.num_workers)
        return {"val_top1": acc["top1"], "val_top5": acc["top5"]}
    if method.val_features is None:
        method.val_features = encode(method.encoder(), cfg.data.val, cfg, env)
    head = method.classifier().head
    was_training = head.training
    head.eval()
    with torch.no_grad():
        logits = head(method.val_features.features.to(env.device)).cpu()
    head.train(was_training)
    return topk_accuracy(logits, method.val_features.labels)


def final_score(run_dir: Path) -> dict[str, float]:
    """The last val top-1 / top-5 record of a probe's metrics.jsonl."""
    from sslforge.trainer.monitor import read_records

    scored = [r for r in read_records(run_dir / "metrics.jsonl") if "val_top1" in r]
    if not scored:
        raise EvalError(f"{run_dir / 'metrics.jsonl'} has no val_top1 record")
    return scored[-1]


__all__ = ["FeatureLoader", "encode", "final_score", "score_val", "topk_accuracy"]
