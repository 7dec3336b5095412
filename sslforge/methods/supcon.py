"""SupCon (Khosla et al., 2020): supervised contrastive learning, SimCLR's spine with the labels
deciding the positives.

    z = normalize(g(f(aug(x))))  for `views` crops of every image     # (b, views, 128)
    loss = supcon_loss(z, labels, T, T_base)   # every crop of every same-label image of every
                                               # rank is a positive; L_out form, x T / T_base

Labels come from each sample's `.cls` (`needs_labels`: a training sample without one stops the
run with an error naming its shard). Head: Linear(d, d), ReLU, Linear(d, 128) with biases, no BN
(SupContrast's SupConResNet); crops: SupContrast's train transform, no blur.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import supcon_loss
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.heads import mlp


@dataclass
class SupConConfig(MethodConfig):
    name: str = "supcon"
    temperature: float = 0.1  # the README's `--temp 0.1`
    base_temperature: float = 0.07  # SupConLoss's default: the loss is scaled by T / T_base
    views: int = 2  # TwoCropTransform


class SupCon(Method):
    config_class = SupConConfig
    needs_labels = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        self.projector = mlp(dim, dim, cfg.model.proj_output_dim, batch_norm=False, hidden_bias=True)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if m.views < 2 or m.temperature <= 0 or m.base_temperature <= 0:
            raise ValueError(f"supcon needs method.views >= 2 and positive temperatures, got views={m.views}, "
                             f"temperature={m.temperature}, base_temperature={m.base_temperature}")
        crops = sum(v.count for v in (list(cfg.data.views) or cls.views(cfg)))
        if crops != m.views:
            raise ValueError(f"supcon takes method.views={m.views} crops per image, the counts of data.views give {crops}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """SupContrast's crops: scale 0.2-1, flip, jitter (0.4, 0.4, 0.4, 0.1) at 0.8, grayscale 0.2."""
        return [ViewConfig(size=cfg.data.image_size, count=cfg.method.views, scale=[0.2, 1.0], brightness=0.4,
                           contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.0)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        crops = batch["views"]
        h = self.backbone(torch.cat(crops))
        z = torch.stack(self.projector(h).chunk(len(crops)), dim=1)  # (b, views, d)
        loss = supcon_loss(z, batch["label"].to(z.device), self.cfg.method.temperature,
                           self.cfg.method.base_temperature)
        return {"loss": loss, "embedding": h[:len(crops[0])].detach()}

    def encoder(self) -> nn.Module:
        return self.backbone
