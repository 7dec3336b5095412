"""SimCLR (Chen et al., 2020): two augmented views, a projection head, NT-Xent over the batch.

    h1, h2 = f(aug1(x)), f(aug2(x))
    z1, z2 = g(h1), g(h2)
    loss = nt_xent(z1, z2, tau)      # negatives: the other 2N-2 views of the global batch
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import nt_xent
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.heads import mlp


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    temperature: float = 0.1
    proj_layers: int = 2  # the paper's v1 head; SimCLR v2 uses 3


class SimCLR(Method):
    config_class = SimCLRConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        self.projector = mlp(dim, cfg.model.proj_hidden_dim, cfg.model.proj_output_dim, cfg.method.proj_layers)
        self.temperature = cfg.method.temperature

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """Two crops from the same distribution: the paper's symmetric augmentation."""
        small = cfg.data.image_size <= 64
        return [ViewConfig(size=cfg.data.image_size, count=2, blur_p=0.0 if small else 0.5)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"]
        h = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(h).chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "embedding": h.detach()}

    def encoder(self) -> nn.Module:
        return self.backbone
