"""BYOL (Grill et al., 2020): an online network predicts a slowly moving target network's
projection of the other view; no negatives.

    online:  y = f(x), z = g(y), p = q(z)           (backbone, projector, predictor)
    target:  z' = g'(f'(x))                         (an EMA of backbone + projector, no predictor)
    loss = ||p̂1 - ẑ'2||² + ||p̂2 - ẑ'1||²            # ||p̂ - ẑ||² = 2 - 2 cos(p, sg z), batch mean
    after each step: ξ ← τ ξ + (1 - τ) θ,  τ_k = 1 - (1 - τ_base)(cos(πk/K) + 1) / 2

Each view goes through the networks on its own, so batch norm normalises it over its own
(global) batch, as in the official code's one forward per view. The target (the momentum encoder
of `methods/momentum.py`) runs in training mode (batch statistics) and keeps its own running
statistics, updated by its forward: the official code applies the target with `is_training=True`
and carries its haiku state separately from the online network's; only parameters are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import negative_cosine
from sslforge.methods.momentum import MomentumEncoderMethod
from sslforge.models.heads import mlp


@dataclass
class BYOLConfig(MethodConfig):
    name: str = "byol"
    base_momentum: float = 0.99  # τ_base: 0.99 for 100/300 epochs, 0.996 for 1000
    pred_hidden_dim: int = 4096


class BYOL(MomentumEncoderMethod):
    config_class = BYOLConfig

    def __init__(self, cfg: DictConfig) -> None:
        out = cfg.model.proj_output_dim
        super().__init__(cfg, lambda dim: mlp(dim, cfg.model.proj_hidden_dim, out, hidden_bias=True))
        self.predictor = mlp(out, cfg.method.pred_hidden_dim, out, hidden_bias=True)

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The paper's asymmetric pair: blur always on view 1 and rarely on view 2, solarize on
        view 2 only. No blur at 64 px and below (3-pixel kernels), as in the CIFAR recipes."""
        small = cfg.data.image_size <= 64
        common = dict(size=cfg.data.image_size, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        return [ViewConfig(**common, blur_p=0.0 if small else 1.0, solarize_p=0.0),
                ViewConfig(**common, blur_p=0.0 if small else 0.1, solarize_p=0.2)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"]
        h1, h2 = self.backbone(x1), self.backbone(x2)
        p1, p2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            t1, t2 = self.momentum_encode(x1), self.momentum_encode(x2)
        loss = _regression(p1, t2) + _regression(p2, t1)
        return {"loss": loss, "embedding": torch.cat([h1, h2]).detach()}


def _regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the L2-normalised vectors, 2 - 2 cos(p, sg z)."""
    return 2.0 + 2.0 * negative_cosine(p, z)
