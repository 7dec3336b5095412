"""Self-emerging Token Labeling (STL, Zhao et al., ICCV 2023): two supervised stages on a FAN.

Stage 1, the token labeler (`stl_labeler`): a ViT with a head on every patch token learns
from the image label alone, through its class token and the mean of its token logits:

    cls, tokens = model.forward_dense(mix(x))                # (B, K), (B, gh, gw, K)
    loss = CE(cls, y) + CE(mean_tokens(tokens), y)           # y: smoothed, mixed labels, 1:1

Stage 2, the student (`stl_student`): the frozen labeler (its evaluated EMA weights) labels every patch
of a clean view of the same image (the student's crop box and flip, `ViewConfig.geometry_of`,
no photometric augmentation), and the student learns from the image label and the token labels:

    t = token_labels(labeler.forward_dense(clean).tokens)    # Gumbel one-hot, smoothed
    t = mix.token_targets(t)                                 # same box / ratio as the images
    cls, tokens = student.forward_dense(mix(x))
    loss = w_cls CE(cls, y) + w_dense mean_tokens CE(tokens, t)

Differences from the released code, on purpose: the labeler sees the clean view unmixed and its
labels are mixed with the images' CutMix box or Mixup ratio, so a token label always describes
the student's patch at the same place (the release feeds the labeler the unmixed clean view
and leaves its labels unmixed while the student's input is mixed); the Gumbel noise of a sample
is keyed by its index, so N ranks equal one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import ViewConfig
from sslforge.losses.token_labels import TOKEN_LABELS, gumbel_uniforms, soft_cross_entropy, token_labels
from sslforge.methods.supervised import Supervised, SupervisedConfig
from sslforge.trainer.group_rules import epochs_to_steps


@dataclass
class STLLabelerConfig(SupervisedConfig):
    name: str = "stl_labeler"
    erase_p: float = 0.3  # FAN's --reprob


class STLLabeler(Supervised):
    config_class = STLLabelerConfig
    dense = True

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        _check_backbone(cfg)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x = batch["views"][0]
        mix = self.draw_mix(step, x.shape[-1])
        y = self.targets(batch, mix, x.device)
        out = self.model.forward_dense(mix.images(x))
        cls_loss = soft_cross_entropy(out.cls, y)
        token_loss = soft_cross_entropy(out.tokens.mean(dim=(1, 2)), y)
        return {"loss": cls_loss + token_loss, "cls_loss": cls_loss.detach(),
                "token_mean_loss": token_loss.detach(), "mix_lambda": torch.tensor(mix.lam, device=x.device)}


@dataclass
class STLStudentConfig(SupervisedConfig):
    name: str = "stl_student"
    erase_p: float = 0.3
    labeler: str = "???"  # the stage-1 run directory or checkpoint
    token_label: str = "gumbel"  # gumbel | argmax | softmax
    cls_weight: float = 1.0
    dense_weight: float = 1.0
    dense_weight_ramp_epochs: float = 0.0  # > 0: dense_weight * sqrt(epoch / ramp) until then (--dynamic-dense-weight: 300)


class STLStudent(Supervised):
    config_class = STLStudentConfig
    dense = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        # A frozen submodule, so it is checkpointed with the student: a resumed student keeps
        # the labeler it started with even if the stage-1 run has written later checkpoints.
        self.labeler = load_labeler(Path(cfg.method.labeler))
        self.labeler.requires_grad_(False)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        _check_backbone(cfg)
        m = cfg.method
        if m.token_label not in TOKEN_LABELS:
            raise ValueError(f"method.token_label '{m.token_label}' is not one of {', '.join(TOKEN_LABELS)}")
        if m.cls_weight < 0 or m.dense_weight < 0 or m.cls_weight + m.dense_weight == 0:
            raise ValueError("method.cls_weight and method.dense_weight must be >= 0, not both 0")
        labeler_cfg = labeler_config(Path(m.labeler))
        if labeler_cfg.method.name != "stl_labeler":
            raise ValueError(f"method.labeler {m.labeler} is a '{labeler_cfg.method.name}' run; "
                             "it must be a stage-1 stl_labeler run")
        if labeler_cfg.method.num_classes != m.num_classes:
            raise ValueError(f"method.labeler predicts {labeler_cfg.method.num_classes} classes, "
                             f"method.num_classes is {m.num_classes}")
        views = list(cfg.data.views) or cls.views(cfg)
        if len(views) != 2 or views[1].geometry_of != 0:
            raise ValueError("stl_student takes two views: the student's crop, then the labeler's clean view "
                             "with geometry_of: 0")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The student's crop (DeiT's, as stage 1) and a clean view of the same box and flip."""
        student = super().views(cfg)[0]
        clean = ViewConfig(size=student.size, count=1, geometry_of=0, jitter_p=0.0, grayscale_p=0.0,
                           blur_p=0.0, solarize_p=0.0, randaugment=None, erase_p=0.0)
        return [student, clean]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """The dense loss's weight per step: constant, or STL's sqrt ramp over epochs."""
        m = self.cfg.method
        weight = np.full(total_steps, m.dense_weight)
        ramp = epochs_to_steps(m.dense_weight_ramp_epochs, steps_per_epoch)
        if ramp > 0:
            epoch = np.arange(total_steps) // steps_per_epoch
            weight = np.where(np.arange(total_steps) < ramp,
                              m.dense_weight * np.sqrt(epoch * steps_per_epoch / ramp), weight)
        return {"dense_weight": weight}

    def train(self, mode: bool = True) -> "STLStudent":
        super().train(mode)
        self.labeler.eval()  # no drop-path, ever: it labels, it does not learn
        return self

    @torch.no_grad()
    def label_tokens(self, clean: torch.Tensor, index: torch.Tensor, step: int) -> torch.Tensor:
        """(b, gh, gw, K) per-token targets from the frozen labeler on the clean view."""
        logits = self.labeler.forward_dense(clean).tokens.float()
        uniforms = None
        if self.cfg.method.token_label == "gumbel":
            uniforms = gumbel_uniforms(tuple(logits.shape[1:]), index, self.cfg.train.seed, step, logits.device)
        return token_labels(logits, self.cfg.method.token_label, self.cfg.method.smoothing, uniforms)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x, clean = batch["views"]
        mix = self.draw_mix(step, x.shape[-1])
        y = self.targets(batch, mix, x.device)
        t = mix.token_targets(self.label_tokens(clean, batch["index"], step))
        out = self.model.forward_dense(mix.images(x))
        if out.tokens.shape != t.shape:
            raise ValueError(f"the student's token grid {tuple(out.tokens.shape[1:3])} differs from the labeler's "
                             f"{tuple(t.shape[1:3])}: give the clean view the student's size and both "
                             "networks the same token stride")
        cls_loss = soft_cross_entropy(out.cls, y)
        dense_loss = soft_cross_entropy(out.tokens, t)
        m = self.cfg.method
        loss = m.cls_weight * cls_loss + self.scheduled.get("dense_weight", m.dense_weight) * dense_loss
        return {"loss": loss, "cls_loss": cls_loss.detach(), "dense_loss": dense_loss.detach(),
                "mix_lambda": torch.tensor(mix.lam, device=x.device)}

    def fp32_modules(self) -> list[nn.Module]:
        return [*super().fp32_modules(), self.labeler]


def _check_backbone(cfg: DictConfig) -> None:
    """Token labels need patch tokens: a FAN or a ViT (`models.tokens.forward_tokens`)."""
    if not cfg.model.backbone.startswith(("fan_", "vit_")):
        raise ValueError(f"{cfg.method.name} needs a backbone with patch tokens (a fan_* or vit_* "
                         f"model.backbone), not '{cfg.model.backbone}'")


def labeler_config(source: Path) -> DictConfig:
    """The saved config of the stage-1 run at `source` (a run directory or one of its checkpoints)."""
    from sslforge.config import load_resolved
    from sslforge.eval.run import run_dir_of

    try:
        return load_resolved(run_dir_of(source) / "config.yaml")
    except FileNotFoundError as exc:
        raise ValueError(f"method.labeler: {exc}") from None


def load_labeler(source: Path) -> nn.Module:
    """The evaluated classifier (EMA weights) of the stage-1 run at `source`, from its best
    loadable checkpoint, in eval mode."""
    from sslforge.eval.run import load_method

    _, _, stage1, _ = load_method(source)
    return stage1.classifier().eval()
