"""MoCo v3 (Chen, Xie & He, 2021): no queue; each query finds its key among the keys of the whole
global batch, encoded by a momentum copy of the base encoder; symmetric, with a predictor.

    q1, q2 = p(g(f(x1))), p(g(f(x2)))         # base encoder (backbone + projector) + predictor
    k1, k2 = g'(f'(x1)), g'(f'(x2))           # momentum encoder (backbone + projector), no grad
    ctr(q, k) = CE(q . all_gather(k)^T / T, r*b + i) * 2T   # keys of every rank, labels offset by rank
    loss = ctr(q1, k2) + ctr(q2, k1)
    theta' <- m theta' + (1 - m) theta,  m_t = 1 - (1 - m0)(cos(pi t / T) + 1) / 2   (per step)

Heads as in the official builder (every Linear without bias, hidden layers Linear-BN-ReLU):
ResNet: projector 2 layers D -> 4096 -> 256 ending in an affine-free BN, predictor 2 layers
256 -> 4096 -> 256 without it; ViT: projector 3 layers, and the predictor ends in BN too. The
ViT's random frozen patch projection and fixed sin-cos position embedding are backbone options
(`model.vit_frozen_patch_embed`, `model.vit_sincos_pos_embed`).

The official code updates the momentum encoder at the start of each forward; here it is updated
in `on_after_optimizer_step`, which is the same sequence (see `methods/base.py`). Step t's update
uses m_t (the official one before step t + 1 uses m_{t+1}: a shift of one step in a schedule of
total_steps).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import info_nce
from sslforge.methods.byol import BYOL
from sslforge.methods.momentum import MomentumEncoderMethod
from sslforge.models.heads import mlp


@dataclass
class MoCoV3Config(MethodConfig):
    name: str = "moco_v3"
    temperature: float = 1.0  # ResNet; 0.2 for ViT
    base_momentum: float = 0.99  # m0, cosine to 1 per step (0.996 for 1000 epochs)
    pred_hidden_dim: int = 4096


def is_vit(cfg: DictConfig) -> bool:
    """The official builder has a ResNet and a ViT variant (heads and crop scale differ)."""
    return str(cfg.model.backbone).startswith("vit")


class MoCoV3(MomentumEncoderMethod):
    config_class = MoCoV3Config

    def __init__(self, cfg: DictConfig) -> None:
        vit, out = is_vit(cfg), cfg.model.proj_output_dim
        super().__init__(cfg, lambda dim: mlp(dim, cfg.model.proj_hidden_dim, out, 3 if vit else 2, last_bn=True))
        self.temperature = cfg.method.temperature
        self.predictor = mlp(out, cfg.method.pred_hidden_dim, out, 2, last_bn=vit)

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2, jitter 0.4, 0.4, 0.2, 0.1),
        with crops from 8% of the image for ViT (the code's default) and from 20% for ResNet
        (`--crop-min=.2` in every published ResNet recipe)."""
        scale = [0.08, 1.0] if is_vit(cfg) else [0.2, 1.0]
        return [replace(view, scale=scale) for view in BYOL.views(cfg)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"]
        h1, h2 = self.backbone(x1), self.backbone(x2)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            k1, k2 = self.momentum_encode(x1), self.momentum_encode(x2)
        t = self.temperature
        loss = 2 * t * (info_nce(q1, k2, t) + info_nce(q2, k1, t))
        return {"loss": loss, "embedding": torch.cat([h1, h2]).detach()}
