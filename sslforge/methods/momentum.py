"""What MoCo v2, MoCo v3 and BYOL share: an online encoder (backbone + projector) trained by the
optimiser, and its momentum copy (MoCo's key encoder, BYOL's target) that only follows it.

    online:    backbone, projector                      (in the optimiser)
    momentum:  momentum_backbone, momentum_projector    (no gradients, float32)
    after each applied step: momentum <- m * momentum + (1 - m) * online   (parameters only)

`m` is a per-step schedule: by default BYOL's and MoCo v3's cosine from `method.base_momentum` to
1; MoCo v2 overrides `momentum_values` with its constant. The copy's batch-norm statistics are its
own, updated by its own forwards, as in the official code. The evaluated network is the online
backbone.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.ema import ema_update_, momentum_copy
from sslforge.trainer.schedule import momentum_schedule


class MomentumEncoderMethod(Method):
    """Base of the methods with a momentum copy of backbone + projector; subclasses give the
    projector (from the backbone's feature width) and write `training_step`."""

    def __init__(self, cfg: DictConfig, projector: Callable[[int], nn.Module]) -> None:
        super().__init__(cfg)
        self.backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        self.projector = projector(dim)
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)

    def momentum_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's projection (call under no_grad)."""
        return self.momentum_projector(self.momentum_backbone(x))

    def momentum_values(self, total_steps: int) -> np.ndarray:
        """m for each step: the cosine from `method.base_momentum` towards 1."""
        base = self.cfg.method.base_momentum
        if not 0.0 <= base <= 1.0:
            raise ValueError(f"method.base_momentum must be in [0, 1], got {base}")
        return momentum_schedule(base, total_steps)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {"momentum": self.momentum_values(total_steps)}

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.scheduled["momentum"]
        ema_update_(self.momentum_backbone, self.backbone, m)
        ema_update_(self.momentum_projector, self.projector, m)

    def fp32_modules(self) -> list[nn.Module]:
        return [self.momentum_backbone, self.momentum_projector]

    def encoder(self) -> nn.Module:
        return self.backbone
