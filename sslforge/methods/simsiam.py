"""SimSiam (Chen & He, 2021): one network, a predictor on one side and a stop-gradient on the
other; no negatives, no momentum encoder.

    z1, z2 = h(f(x1)), h(f(x2))                    # backbone + 3-layer projector (last BN affine-free)
    p1, p2 = q(z1), q(z2)                          # bottleneck predictor 2048 -> 512 -> 2048
    loss = -(cos(p1, sg z2) + cos(p2, sg z1)) / 2
    the predictor's learning rate stays at its initial value while the rest follows the cosine

Each view goes through the network on its own, so batch norm normalises it over its own (global)
batch, as in the official `encoder(x1)`, `encoder(x2)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import negative_cosine
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.heads import mlp


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    proj_layers: int = 3  # the paper's ImageNet projector; its CIFAR one has 2
    pred_hidden_dim: int = 512  # the bottleneck: a quarter of the projection's width
    fix_pred_lr: bool = True  # the official `--fix-pred-lr`, used for the published results


class SimSiam(Method):
    config_class = SimSiamConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        out = cfg.model.proj_output_dim
        self.projector = mlp(dim, cfg.model.proj_hidden_dim, out, cfg.method.proj_layers, last_bn=True)
        self.predictor = mlp(out, cfg.method.pred_hidden_dim, out)

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """MoCo v2's "aug+" for both views: crops from 20% of the image, milder colour jitter.
        No blur at 64 px and below (3-pixel kernels)."""
        small = cfg.data.image_size <= 64
        return [ViewConfig(size=cfg.data.image_size, count=2, scale=[0.2, 1.0], brightness=0.4,
                           contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.0 if small else 0.5)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"]
        h1, h2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return {"loss": loss, "embedding": torch.cat([h1, h2]).detach()}

    def param_groups(self) -> list[dict[str, Any]]:
        """The predictor in its own group, whose lr the trainer holds at the peak."""
        encoder = [p for m in (self.backbone, self.projector) for p in m.parameters() if p.requires_grad]
        return [{"params": encoder},
                {"params": list(self.predictor.parameters()), "fixed_lr": bool(self.cfg.method.fix_pred_lr)}]

    def encoder(self) -> nn.Module:
        return self.backbone
