"""SwAV (Caron et al., 2020): swapping assignments between views, codes by Sinkhorn-Knopp.

    z = normalize(g(f(crop)))  for every crop        # 2 global + N local crops (multi-crop)
    p = z C^T                                        # scores against K unit-norm prototypes C
    q_i = sinkhorn([queue_i C^T; p_i])[-b:]          # codes of global crop i, no gradient,
                                                     # every prototype used equally over the batch
    loss = mean_i mean_{v != i} -sum_k q_i log softmax(p_v / T)   # swapped prediction
    after the step: C <- normalize(C); queue_i <- [z_i of every rank; queue_i][:L]

Network: backbone -> Linear 2048, BN, ReLU -> Linear 128 -> L2-normalise -> prototypes
`Linear(128, K, bias=False)` (src/resnet50.py). Codes come from the two global crops only
(`crops_for_assign` 0 and 1); every other crop, local ones included, predicts them.

Prototypes have unit rows: normalised once here and again after every applied step that trained
them, which is the official normalisation at the start of each iteration one call earlier; a
skipped step never reaches it, and a frozen one leaves them bit-identical. ZeRO 1/2 keep
partitioned fp32 master weights that would overwrite an in-place change, so ZeRO is refused
(SwAV's ResNet-50 does not need it). They are frozen for the first `freeze_prototypes_epochs`
(the official 313 iterations at batch 4096, 5005 at 256: one epoch): their own parameter group,
which the trainer keeps still with its optimiser state.

The queue (`queue_length` > 0, the official at batch 256) holds the embeddings, not the scores,
of the two global crops of every rank, gathered without gradient and enqueued after each applied
step from epoch `epoch_queue_starts` on, so it is the same on every rank and a checkpoint holds
it whole. Once full, it enters the codes only (never the loss): each rank prepends its share of
the queue's rows, scored against the current prototypes, to its batch before Sinkhorn, so the
ranks together hold the whole queue, as the official per-rank queues do (the codes do not depend
on the rows' order). Its length must be a multiple of the global batch (the official rounds it
down; here it is refused, as MoCo's queue).

Collapse (loss stuck at ln K, every sample given the same uniform code) is logged as
`loss_over_log_k` (1 at collapse) and `code_std`: the std over the global batch of each
prototype's code, averaged over prototypes and scaled by sqrt(K) (0 at collapse, ~1 for hard,
balanced codes). `embedding` is the backbone's features of the first crop, as the other methods.

Optimisation (recipes): LARS at batch 4096 with weight decay 1e-6 and trust-ratio adaptation on
every parameter (`optim.exclude_bias_and_norm: false`, as apex LARC wraps all of them; our LARS's
ratio is eta |w| / |g + wd w|, apex LARC's eta |w| / (|g| + wd |w| + 1e-8), the same up to the
triangle inequality at wd 1e-6), SyncBN, bf16 autocast where the official uses apex fp16; the
embeddings' normalisation and the prototype scores stay float32 (autocast off), as the losses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import autocast_disabled, sinkhorn, swav_loss
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.heads import mlp
from sslforge.models.multicrop import forward_multicrop, require_global_crops
from sslforge.trainer.group_rules import epochs_to_steps

GLOBAL_CROPS = 2  # crops_for_assign 0, 1
LOCAL_TO_GLOBAL = 96 / 224  # SwAV's local crop side relative to its global one


@dataclass
class SwAVConfig(MethodConfig):
    name: str = "swav"
    num_prototypes: int = 3000  # K; head widths: model.proj_hidden_dim, model.proj_output_dim
    temperature: float = 0.1
    epsilon: float = 0.05  # Sinkhorn's entropic regularisation
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0  # 313 iterations at batch 4096
    queue_length: int = 0  # rows per global crop, all ranks together; 0: no queue
    epoch_queue_starts: int = 15
    local_crops: int = 6
    local_size: Optional[int] = None  # pixels; None: 96/224 of data.image_size
    global_scale: List[float] = field(default_factory=lambda: [0.14, 1.0])
    local_scale: List[float] = field(default_factory=lambda: [0.05, 0.14])


class SwAV(Method):
    config_class = SwAVConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        out = cfg.model.proj_output_dim
        self.projector = mlp(dim, cfg.model.proj_hidden_dim, out, batch_norm=True, hidden_bias=True)
        self.prototypes = nn.Linear(out, m.num_prototypes, bias=False)
        self._normalise_prototypes()
        self.register_buffer("queue", torch.zeros(GLOBAL_CROPS, m.queue_length, out))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # rows, up to L
        self._new_embeddings: torch.Tensor | None = None  # this step's, every rank's, enqueued after it

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        _check_config(cfg)

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """SwAV's crops (src/multicropdataset.py): 2 global + `local_crops` small ones, all with
        flip, colour jitter (0.8, 0.8, 0.8, 0.2) at p 0.8, grayscale 0.2 and blur half the time
        (the ViewConfig defaults); no blur at 64 px and below, as the other methods' small views.
        `data.views`, when a recipe gives it, replaces these."""
        m, size = cfg.method, cfg.data.image_size
        if m.local_crops < 0:
            raise ValueError(f"method.local_crops must be >= 0, got {m.local_crops}")
        blur = 0.0 if size <= 64 else 0.5
        first = ViewConfig(size=size, count=GLOBAL_CROPS, scale=list(m.global_scale), blur_p=blur)
        local_size = m.local_size or max(1, round(size * LOCAL_TO_GLOBAL))
        local = ViewConfig(size=local_size, count=m.local_crops, scale=list(m.local_scale), blur_p=blur)
        return [first] + ([local] if m.local_crops else [])

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per step: whether the queue takes this step's embeddings (from `epoch_queue_starts`),
        and whether the prototypes are still frozen (the trainer's rounding of freeze_epochs)."""
        m, step = self.cfg.method, np.arange(total_steps)
        filling = (step >= m.epoch_queue_starts * steps_per_epoch) & (m.queue_length > 0)
        frozen = step < epochs_to_steps(m.freeze_prototypes_epochs, steps_per_epoch)
        return {"queue_filling": filling.astype(float), "prototypes_frozen": frozen.astype(float)}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        crops = batch["views"]
        b = len(crops[0])
        h = forward_multicrop(self.backbone, crops)
        projected = self.projector(h)
        with autocast_disabled(projected):
            z = F.normalize(projected.float(), dim=1)
        scores = self._score(z)
        codes = [self._codes(scores[i * b:(i + 1) * b].detach(), i) for i in range(GLOBAL_CROPS)]
        loss = swav_loss(list(scores.chunk(len(crops))), codes, self.cfg.method.temperature)
        if self.scheduled.get("queue_filling"):  # enqueued after an applied step only
            self._new_embeddings = _gather_crops(z[:GLOBAL_CROPS * b].detach().reshape(GLOBAL_CROPS, b, -1))
        return {"loss": loss, "embedding": h[:b].detach(), **self._collapse_signals(loss, codes)}

    def _score(self, z: torch.Tensor) -> torch.Tensor:
        """Scores against the prototypes in float32, autocast off: Sinkhorn divides them by
        epsilon 0.05 and the loss by T 0.1, so bf16's rounding (0.004 on a score near 1) would
        move every exponent by up to 0.08."""
        with autocast_disabled(z):
            return self.prototypes(z.float())

    @torch.no_grad()
    def _codes(self, crop_scores: torch.Tensor, crop: int) -> torch.Tensor:
        """Codes of this rank's rows of global crop `crop`; a full queue adds this rank's share
        of its rows, scored against the current prototypes, to Sinkhorn's batch."""
        m, b = self.cfg.method, len(crop_scores)
        if self._queue_full():
            crop_scores = torch.cat([self._score(self._queue_share(crop)), crop_scores])
        return sinkhorn(crop_scores, m.epsilon, m.sinkhorn_iterations)[-b:]

    def _queue_full(self) -> bool:
        return self.queue.shape[1] > 0 and int(self.queue_filled) == self.queue.shape[1]

    def _queue_share(self, crop: int) -> torch.Tensor:
        """Rows [r L/W, (r+1) L/W) of the queue for rank r: the ranks' shares make the whole queue."""
        rows = self.queue.shape[1] // distributed.world_size()
        start = distributed.rank() * rows
        return self.queue[crop, start:start + rows]

    @torch.no_grad()
    def _collapse_signals(self, loss: torch.Tensor, codes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """loss / ln K (1 at collapse) and `code_std` (0 at collapse)."""
        k = codes[0].shape[1]
        return {"loss_over_log_k": loss.detach() / float(np.log(k)), "code_std": code_std(torch.cat(codes))}

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        if not self.scheduled.get("prototypes_frozen"):
            self._normalise_prototypes()
        if self._new_embeddings is not None:
            self._enqueue(self._new_embeddings)
            self._new_embeddings = None

    @torch.no_grad()
    def _normalise_prototypes(self) -> None:
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1))

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor) -> None:
        """Newest first: the global batch's embeddings (2, B, d) in, the oldest B rows out."""
        length, batch = self.queue.shape[1], embeddings.shape[1]
        self.queue.copy_(torch.cat([embeddings.to(self.queue.dtype), self.queue[:, :length - batch]], dim=1))
        self.queue_filled.fill_(min(length, int(self.queue_filled) + batch))

    def param_groups(self) -> list[dict[str, Any]]:
        """The prototypes are their own group, frozen for the first iterations."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if not n.startswith("prototypes.")]},
                {"params": [self.prototypes.weight],
                 "freeze_epochs": float(self.cfg.method.freeze_prototypes_epochs)}]

    def encoder(self) -> nn.Module:
        return self.backbone


@torch.no_grad()
def code_std(codes: torch.Tensor) -> torch.Tensor:
    """sqrt(K) x the std over every rank's samples of each prototype's code, averaged over the
    prototypes: 0 when every sample has the same code (collapse), sqrt(1 - 1/K) for one-hot codes
    spread evenly over the prototypes. Exact over ranks: every rank's sums of q and q^2."""
    q = codes.float()
    local = torch.stack([q.sum(0), (q * q).sum(0)]).to(distributed.comm_device())
    total = distributed.all_reduce_sum(local).to(q.device)
    n = len(q) * distributed.world_size()
    mean = total[0] / n
    std = (total[1] / n - mean * mean).clamp(min=0).sqrt()
    return std.mean() * float(np.sqrt(q.shape[1]))


@torch.no_grad()
def _gather_crops(embeddings: torch.Tensor) -> torch.Tensor:
    """(crops, b, d) of this rank -> (crops, B, d) of every rank, in rank order."""
    crops, b, d = embeddings.shape
    flat = embeddings.transpose(0, 1).reshape(b, crops * d).to(distributed.comm_device())
    gathered = distributed.all_gather(flat).to(embeddings.device)
    return gathered.reshape(-1, crops, d).transpose(0, 1).contiguous()


def _check_config(cfg: DictConfig) -> None:
    require_global_crops("swav", list(cfg.data.views) or SwAV.views(cfg), GLOBAL_CROPS)
    m, batch = cfg.method, cfg.optim.batch_size
    if m.num_prototypes < 1 or m.temperature <= 0:
        raise ValueError(f"swav needs method.num_prototypes >= 1 and method.temperature > 0, "
                         f"got {m.num_prototypes} and {m.temperature}")
    if m.queue_length < 0 or m.queue_length % batch:
        raise ValueError(f"method.queue_length={m.queue_length} must be 0 (no queue) or a multiple of "
                         f"the global batch optim.batch_size={batch}: each step enqueues one whole "
                         f"global batch (the official rounds it down: use {m.queue_length - m.queue_length % batch})")
    if cfg.engine.zero_stage > 0:
        raise ValueError(f"swav needs engine.zero_stage=0, got {cfg.engine.zero_stage}: its prototypes are "
                         "L2-normalised in place after each step, and ZeRO 1/2's partitioned fp32 master "
                         "weights would overwrite that (SwAV's ResNet-50 does not need ZeRO)")
