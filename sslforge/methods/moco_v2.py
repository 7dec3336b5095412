"""MoCo v2 (Chen, Fan, Girshick & He, 2020): a query encoder learns to pick its key, encoded by a
slowly moving copy of itself, out of a long queue of keys from earlier batches.

    q = g(f(aug(x)))                         # query: backbone + MLP head (2048, ReLU, 128)
    k = g'(f'(aug'(x)))                      # key encoder, no gradient, batch shuffled across ranks
    loss = CE([q.k, q.queue^T] / T, 0)       # InfoNCE, the positive key against K queued negatives
    enqueue the keys of every rank; dequeue the oldest
    theta' <- m theta' + (1 - m) theta       # m = 0.999, constant

One direction only (query = view 1, key = view 2), as the official code: MoCo v2 is not
symmetrised. The key encoder's momentum update and the enqueue happen in
`on_after_optimizer_step`: the official code updates the key encoder at the start of each forward,
from the query encoder the previous step left, which is the same sequence (the first update there
averages two equal networks). The keys are kept on `self` during the forward and enqueued after a
step that was applied, so a skipped step leaves the queue as it was.

Shuffle BN: with per-rank batch norm, a query and its key would share one rank's batch
statistics, a signature the model can use to find its key without learning anything. The key
encoder therefore runs on a random permutation of the global batch cut into per-rank slices, and
its outputs are put back in order (`shuffle_across_ranks`, `unshuffle_across_ranks`). With it the
official recipe keeps per-rank BN (`model.sync_bn false`); `shuffle_bn false` with
`model.sync_bn true` is the SyncBN alternative (N ranks then equal one rank).

Hard-negative mixing (MoCHi, Kalantidis et al. 2020), `method.hard_negatives`: from epoch
`hard_start_epoch`, each query also meets `hard_mix` synthetic negatives mixed from two of its
`hard_num` hardest queue items and `hard_mix_query` mixed from itself and one of them
(`losses.mochi_info_nce`); they are detached, never enqueued, and drawn alike on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import info_nce, mochi_info_nce
from sslforge.methods.momentum import MomentumEncoderMethod
from sslforge.models.heads import mlp
from sslforge.trainer.group_rules import epochs_to_steps


@dataclass
class MoCoV2Config(MethodConfig):
    name: str = "moco_v2"
    temperature: float = 0.2  # v2's `--moco-t 0.2` (v1: 0.07)
    queue_size: int = 65536  # K, a multiple of the global batch
    momentum: float = 0.999  # key encoder, constant
    shuffle_bn: bool = True  # the official shuffle; false with model.sync_bn true for SyncBN
    hard_negatives: bool = False  # MoCHi: per-query synthetic negatives mixed from the hardest ones
    hard_num: int = 1024  # N: the hardest queue negatives of each query, mixed from
    hard_mix: int = 512  # s: mixes of two of them
    hard_mix_query: int = 256  # s': mixes of the query with one of them
    hard_start_epoch: int = 10  # plain InfoNCE before (synco's warm-up; the MoCHi paper's is unverified)


class MoCoV2(MomentumEncoderMethod):
    config_class = MoCoV2Config

    def __init__(self, cfg: DictConfig) -> None:
        out = cfg.model.proj_output_dim
        super().__init__(cfg, lambda dim: mlp(dim, cfg.model.proj_hidden_dim, out, batch_norm=False,
                                              hidden_bias=True))
        self.temperature = cfg.method.temperature
        self.register_buffer("queue", F.normalize(torch.randn(cfg.method.queue_size, out), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: torch.Tensor | None = None  # this step's global keys, enqueued after it

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        queue, batch = cfg.method.queue_size, cfg.optim.batch_size
        if queue <= 0 or queue % batch:
            raise ValueError(f"method.queue_size={queue} must be a positive multiple of the global batch "
                             f"optim.batch_size={batch}: each step enqueues one whole global batch")
        if not 0.0 <= cfg.method.momentum <= 1.0:
            raise ValueError(f"method.momentum must be in [0, 1], got {cfg.method.momentum}")
        m = cfg.method
        if m.hard_negatives and not 0 < m.hard_num <= queue:
            raise ValueError(f"method.hard_num={m.hard_num} must be in [1, method.queue_size={queue}]")
        if m.hard_negatives and (m.hard_mix < 0 or m.hard_mix_query < 0):
            raise ValueError(f"method.hard_mix and hard_mix_query must be >= 0, got {m.hard_mix}, {m.hard_mix_query}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The "aug+" of MoCo v2, the same for query and key: crops from 20% of the image, colour
        jitter (0.4, 0.4, 0.4, 0.1), blur half the time. No blur at 64 px and below (3-pixel
        kernels), as in the other methods' small-image views."""
        small = cfg.data.image_size <= 64
        return [ViewConfig(size=cfg.data.image_size, count=2, scale=[0.2, 1.0], brightness=0.4,
                           contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.0 if small else 0.5)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        h, q, k = self.query_and_key(*batch["views"][:2])
        return {"loss": self.instance_loss(q, k, step), "embedding": h.detach()}

    def instance_loss(self, q: torch.Tensor, k: torch.Tensor, step: int) -> torch.Tensor:
        """InfoNCE against the queue; with `hard_negatives`, from `hard_start_epoch` on, MoCHi's
        synthetic negatives join each query's logits (drawn alike on every rank)."""
        m = self.cfg.method
        if m.hard_negatives and self.scheduled["hard_negatives"]:
            return mochi_info_nce(q, k, self.queue, self.temperature, m.hard_num, m.hard_mix, m.hard_mix_query,
                                  self.step_generator(step, q.device))
        return info_nce(q, k, self.temperature, self.queue)

    def step_generator(self, step: int, device: torch.device) -> torch.Generator:
        """The same random stream on every rank for this step (and on a resumed run)."""
        return torch.Generator(device=device).manual_seed(self.cfg.train.seed * 1_000_003 + step)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        start = epochs_to_steps(self.cfg.method.hard_start_epoch, steps_per_epoch)
        return {**super().schedules(total_steps, steps_per_epoch),
                "hard_negatives": (np.arange(total_steps) >= start).astype(float)}

    def query_and_key(self, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(backbone features, projection) of the query crops and this rank's keys; every rank's
        keys are kept for the enqueue after the step."""
        h = self.backbone(x_q)
        q = self.projector(h)
        with torch.no_grad():
            keys = self._global_keys(x_k)
        self._new_keys = keys
        return h, q, own_rows(keys, len(x_q))

    def _global_keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """Normalised keys of every rank's samples, in global batch order (B, d)."""
        if self.cfg.method.shuffle_bn:
            shuffled, order = shuffle_across_ranks(x_k)
            return unshuffle_across_ranks(self._key(shuffled), order)
        return distributed.all_gather(self._key(x_k))

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.momentum_encode(x), dim=1)

    def momentum_values(self, total_steps: int) -> np.ndarray:
        """MoCo v2's momentum is constant."""
        return np.full(total_steps, float(self.cfg.method.momentum))

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        super().on_after_optimizer_step(step, total_steps)
        if self._new_keys is not None:
            self._enqueue(self._new_keys)
            self._new_keys = None

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest len(keys) entries (K is a multiple of the global batch, so a
        batch never straddles the end)."""
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + len(keys)] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(keys)) % len(self.queue))



def own_rows(global_rows: torch.Tensor, local_batch: int) -> torch.Tensor:
    """This rank's slice of a tensor laid out in global batch order (rank-major)."""
    start = distributed.rank() * local_batch
    return global_rows[start:start + local_batch]


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch drawn in a random order that all ranks share
    (rank 0's, broadcast), and that order: batch norm then mixes samples of every rank."""
    gathered = distributed.all_gather(x)
    order = torch.randperm(len(gathered), device=distributed.comm_device())
    distributed.broadcast(order, src=0)
    order = order.to(x.device)
    return own_rows(gathered[order], len(x)), order


@torch.no_grad()
def unshuffle_across_ranks(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Every rank's outputs for its `shuffle_across_ranks` share, back in global batch order."""
    return distributed.all_gather(y)[torch.argsort(order)]
