"""DINO (Caron et al., 2021): self-distillation with no labels, a student matching an EMA teacher.

    globals, locals = 2 crops of data.image_size, N smaller crops    # multi-crop
    t = softmax((teacher(globals) - C) / tau_t)                       # centred, sharpened
    s = log_softmax(student(globals + locals) / tau_s)
    loss = mean over pairs (i, v), i a global crop, v != i, of CE(t_i, s_v)
    C = 0.9 C + 0.1 mean(teacher outputs of every rank)               # after the step
    teacher = m teacher + (1 - m) student                             # m: 0.996 -> 1, cosine

Student and teacher are backbone + DINO head (MLP, L2-normalised bottleneck, weight-normalised
last layer). The teacher is the student's architecture without drop-path, outside the optimiser
and float32; it is the network DINO evaluates, so `encoder()` is its backbone. The teacher
temperature warms up per epoch, the momentum rises per step (`schedules`); the last layer is
frozen for `freeze_last_layer` epochs (its own parameter group); the weight-decay cosine and the
per-parameter gradient clipping are the trainer's (`optim.weight_decay_end`,
`engine.grad_clip_mode=per_param`), set by the recipes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import dino_center, dino_loss
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.ema import ema_update_, momentum_copy
from sslforge.models.heads import DINOHead
from sslforge.models.multicrop import forward_multicrop, require_global_crops
from sslforge.trainer.schedule import momentum_schedule, per_epoch

GLOBAL_CROPS = 2
LOCAL_TO_GLOBAL = 96 / 224  # DINO's local crop side relative to its global one


@dataclass
class DINOConfig(MethodConfig):
    name: str = "dino"
    out_dim: int = 65536  # K, the head's output; hidden and bottleneck: model.proj_hidden/output_dim
    head_layers: int = 3
    head_bn: bool = False  # `use_bn_in_head`
    norm_last_layer: bool = True  # weight norm's g frozen at 1 (the README turns it off for ViT-S)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0  # linear from warmup_teacher_temp, then constant
    momentum_teacher: float = 0.996  # cosine to 1 over the run, per step
    center_momentum: float = 0.9
    freeze_last_layer: float = 1.0  # epochs with the last layer frozen
    local_crops: int = 8
    local_size: Optional[int] = None  # pixels; None: 96/224 of data.image_size
    global_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per crop size, the head over the
    concatenated features (DINO's MultiCropWrapper)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.head(forward_multicrop(self.backbone, crops))


class DINO(Method):
    config_class = DINOConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        m = cfg.method
        backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        head = DINOHead(dim, m.out_dim, hidden_dim=cfg.model.proj_hidden_dim,
                        bottleneck_dim=cfg.model.proj_output_dim, num_layers=m.head_layers,
                        batch_norm=m.head_bn, norm_last_layer=m.norm_last_layer)
        self.student = MultiCropNetwork(backbone, head)
        self.teacher = self._build_teacher(cfg, self.student)
        self.register_buffer("center", torch.zeros(1, m.out_dim))
        self._teacher_out: list[torch.Tensor] | None = None  # this step's, for the centre update

    @staticmethod
    def _build_teacher(cfg: DictConfig, student: MultiCropNetwork) -> nn.Module:
        """The student's weights in the same architecture built without drop-path (as DINO
        builds its teacher), with no gradients."""
        no_drop_path = OmegaConf.merge(cfg.model, {"drop_path": 0.0})
        backbone, _ = build_backbone(no_drop_path, cfg.data.image_size)
        backbone.load_state_dict(student.backbone.state_dict())
        return momentum_copy(MultiCropNetwork(backbone, student.head))

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """The teacher sees the first two crops: there must be at least two."""
        require_global_crops("dino", list(cfg.data.views) or cls.views(cfg), GLOBAL_CROPS)

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """DINO's crops: global 1 always blurred, global 2 rarely blurred and sometimes solarised,
        `local_crops` small crops blurred half the time; the same flip, jitter and grayscale on all.
        `data.views`, when a recipe gives it, replaces these."""
        m, size = cfg.method, cfg.data.image_size
        if m.local_crops < 0:
            raise ValueError(f"method.local_crops must be >= 0, got {m.local_crops}")
        colour = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                      grayscale_p=0.2)
        first = ViewConfig(size=size, count=1, scale=list(m.global_scale), blur_p=1.0, **colour)
        second = ViewConfig(size=size, count=1, scale=list(m.global_scale), blur_p=0.1, solarize_p=0.2, **colour)
        local_size = m.local_size or max(1, round(size * LOCAL_TO_GLOBAL))
        local = ViewConfig(size=local_size, count=m.local_crops, scale=list(m.local_scale), blur_p=0.5, **colour)
        return [first, second] + ([local] if m.local_crops else [])

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Teacher temperature: linear over the warm-up epochs, then constant, one value per epoch
        (DINOLoss); teacher momentum: cosine from its base to 1, one value per step."""
        m = self.cfg.method
        warmup = np.linspace(m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs)
        return {"teacher_temp": per_epoch(np.append(warmup, m.teacher_temp), steps_per_epoch, total_steps),
                "teacher_momentum": momentum_schedule(m.momentum_teacher, total_steps)}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        crops = batch["views"]
        with torch.no_grad():
            features = forward_multicrop(self.teacher.backbone, crops[:GLOBAL_CROPS])
            teacher_out = list(self.teacher.head(features).chunk(GLOBAL_CROPS))
        student_out = list(self.student(crops).chunk(len(crops)))
        loss = dino_loss(student_out, teacher_out, self.center, self.cfg.method.student_temp,
                         self.scheduled["teacher_temp"])
        self._teacher_out = teacher_out  # the centre moves after the step, never on a skipped one
        return {"loss": loss, "embedding": features[:len(crops[0])]}

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.center.copy_(dino_center(self._teacher_out, self.center, self.cfg.method.center_momentum))
        self._teacher_out = None
        ema_update_(self.teacher, self.student, self.scheduled["teacher_momentum"])

    def param_groups(self) -> list[dict[str, Any]]:
        """The weight-normalised last layer is its own group, frozen for the first epoch(s)."""
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if "last_layer" not in n]},
                {"params": [p for n, p in named if "last_layer" in n],
                 "freeze_epochs": float(self.cfg.method.freeze_last_layer)}]

    def fp32_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def encoder(self) -> nn.Module:
        return self.teacher.backbone
