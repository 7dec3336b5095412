"""Supervised classification on the same spine (DeiT's recipe, as FAN and STL train):

    x, y   = randaugment_crop(image), smooth(one_hot(label), 0.1)     # + random erasing
    mix    = Mixup or CutMix of the rank's batch (draw_mix)
    loss   = CE(model(mix(x)), mix(y))
    after each applied step: ema <- d * ema + (1 - d) * model        (parameters and buffers)

The evaluated classifier (top-1 on `data.val` at every evaluation, `sslforge eval robustness`)
is the EMA copy when `method.ema_decay` > 0, as timm's `--model-ema`; the encoder is its
backbone. Labels come from each sample's `.cls`. Subclasses (STL's stages) change the network
to a dense one and the loss; the crops, mixing, smoothing and EMA stay here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import MethodConfig, ViewConfig
from sslforge.data_pipeline.mixing import Mix, MixConfig, draw_mix, mix_generator
from sslforge.losses.token_labels import smooth_one_hot, soft_cross_entropy
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.ema import ema_update_, momentum_copy
from sslforge.models.token_classifier import Classifier


@dataclass
class SupervisedConfig(MethodConfig):
    name: str = "supervised"
    num_classes: int = 1000
    smoothing: float = 0.1  # label smoothing (timm's --smoothing)
    mixup_alpha: float = 0.8  # 0 disables Mixup
    cutmix_alpha: float = 1.0  # 0 disables CutMix
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # CutMix rather than Mixup, when both are on
    randaugment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm spec; null: none
    erase_p: float = 0.25  # random erasing (DeiT 0.25, FAN/STL 0.3)
    ema_decay: float = 0.99992  # model EMA per step; 0: evaluate the model itself


class Supervised(Method):
    config_class = SupervisedConfig
    needs_labels = True
    dense = False  # a per-token head (STL)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        self.model = Classifier(backbone, dim, cfg.method.num_classes, dense=self.dense)
        self.ema = momentum_copy(self.model) if cfg.method.ema_decay > 0 else None
        m = cfg.method
        self.mixing = MixConfig(m.mixup_alpha, m.cutmix_alpha, m.mix_prob, m.mix_switch_prob)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if m.num_classes < 2:
            raise ValueError(f"method.num_classes must be >= 2, got {m.num_classes}")
        for key in ("smoothing", "mix_prob", "mix_switch_prob", "erase_p"):
            if not 0.0 <= m[key] <= 1.0:
                raise ValueError(f"method.{key} must be in [0, 1], got {m[key]}")
        if m.mixup_alpha < 0 or m.cutmix_alpha < 0:
            raise ValueError("method.mixup_alpha and method.cutmix_alpha must be >= 0 (0 disables)")
        if not 0.0 <= m.ema_decay < 1.0:
            raise ValueError(f"method.ema_decay must be in [0, 1), got {m.ema_decay}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """DeiT's train crop: scale 0.08-1, flip, RandAugment (which replaces colour jitter,
        as in timm's transform), random erasing."""
        m = cfg.method
        return [ViewConfig(size=cfg.data.image_size, count=1, scale=[0.08, 1.0], flip_p=0.5, jitter_p=0.0,
                           grayscale_p=0.0, blur_p=0.0, randaugment=m.randaugment, erase_p=m.erase_p)]

    def draw_mix(self, step: int, size: int) -> Mix:
        return draw_mix(self.mixing, size, mix_generator(self.cfg.train.seed, step, distributed.rank()))

    def targets(self, batch: dict[str, Any], mix: Mix, device: torch.device) -> torch.Tensor:
        """The batch's smoothed one-hot labels, mixed like its images."""
        y = smooth_one_hot(batch["label"].to(device), self.cfg.method.num_classes, self.cfg.method.smoothing)
        return mix.targets(y)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x = batch["views"][0]
        mix = self.draw_mix(step, x.shape[-1])
        logits = self.model(mix.images(x))
        return {"loss": soft_cross_entropy(logits, self.targets(batch, mix, x.device)),
                "mix_lambda": torch.tensor(mix.lam, device=x.device)}

    def param_groups(self) -> list[dict[str, Any]]:
        """The backbone's own no-decay parameters (FAN's class token, as timm's optimiser factory
        reads `no_weight_decay`) in a group of their own; biases and norms are split off by the
        trainer."""
        exempt = getattr(self.model.backbone, "no_weight_decay", set)()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        keep = [p for n, p in named if n.removeprefix("backbone.") in exempt]
        groups = [{"params": [p for n, p in named if n.removeprefix("backbone.") not in exempt]}]
        return groups + ([{"params": keep, "no_decay": True}] if keep else [])

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.ema is not None:
            ema_update_(self.ema, self.model, self.cfg.method.ema_decay, buffers=True)

    def classifier(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    def encoder(self) -> nn.Module:
        return self.classifier().backbone

    def fp32_modules(self) -> list[nn.Module]:
        return [self.ema] if self.ema is not None else []
