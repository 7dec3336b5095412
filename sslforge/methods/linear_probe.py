"""Linear evaluation: a linear classifier on the frozen encoder of a pretrained run.

    f      = stop_grad(encoder(x))                 # the pretrained run's evaluated encoder, eval mode
    logits = W (BN(f)) + b                         # BN without affine parameters, optional (MAE)
    loss   = CE(logits, y)

The protocol of the official linear evaluations (MoCo v3 `main_lincls.py`, DINO `eval_linear.py`):
the encoder stays in eval mode (its batch norm uses the pretrained running statistics, as
`model.eval()` there), the head starts from N(0, 0.01) weights and zero bias, training crops
are RandomResizedCrop(0.08-1) + flip, val images are resized and centre-cropped (the evaluation
transform). `method.source` names the pretrained checkpoint; the run's `model` section is that
run's, copied when the recipe is loaded (`resolve_config`), so the linear run's config.yaml
describes the network it holds.

With `method.cache_features` (the fast path), every training and val image is encoded once with
the evaluation transform (all ranks in parallel) and the head trains on those features
(`eval/linear.py`): no augmentation, so the number it gives is the linear separability of the
centre-crop features, usually a little below the augmented protocol's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge.config import ConfigError, MethodConfig, ViewConfig
from sslforge.eval.features import DatasetFeatures
from sslforge.methods.base import EvalContext, Method
from sslforge.models.norm import GlobalBatchNorm
from sslforge.models.token_classifier import Classifier


@dataclass
class LinearProbeConfig(MethodConfig):
    name: str = "linear"
    source: str = "???"  # the pretrained run's checkpoint (or run) directory
    num_classes: int = 1000
    feature_bn: bool = False  # BatchNorm1d(affine=False, eps=1e-6) on the features, statistics over all ranks
    cache_features: bool = False  # encode every image once (centre crop) and train the head on the features


def source_config(source: str) -> DictConfig:
    """The resolved config of the pretrained run at `source`; a ConfigError naming the key if none."""
    from sslforge.config import load_resolved
    from sslforge.eval.run import run_dir_of

    try:
        return load_resolved(run_dir_of(Path(source)) / "config.yaml")
    except FileNotFoundError:
        raise ConfigError(f"invalid value for 'method.source': no pretrained run (with config.yaml) at or "
                          f"above {source}") from None


def pretrained_encoder(source: str) -> tuple[nn.Module, int]:
    """The evaluated encoder of the pretrained checkpoint at `source`, and its step."""
    from sslforge.eval.run import load_method

    _, _, pretrained, step = load_method(Path(source))
    return pretrained.encoder(), step


class LinearProbe(Method):
    config_class = LinearProbeConfig
    needs_labels = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        encoder, self.source_step = pretrained_encoder(cfg.method.source)
        dim = _feature_dim(encoder, cfg.data.image_size)
        self.model = Classifier(encoder.requires_grad_(False).eval(), dim, cfg.method.num_classes)
        nn.init.normal_(self.model.head.weight, std=0.01)  # main_lincls / eval_linear
        nn.init.zeros_(self.model.head.bias)
        if cfg.method.feature_bn:
            self.model.head = nn.Sequential(GlobalBatchNorm(dim, eps=1e-6, affine=False), self.model.head)
        self.val_features: DatasetFeatures | None = None  # the fast path's, encoded at the first evaluation

    @classmethod
    def resolve_config(cls, cfg: DictConfig) -> None:
        """The encoder is the pretrained run's: its `model` section replaces the recipe's."""
        if cfg.method.source != "???":
            cfg.model = source_config(cfg.method.source).model

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        if cfg.method.source == "???":
            raise ValueError("missing required config key 'method.source' (the pretrained run or checkpoint)")
        if cfg.method.num_classes < 2:
            raise ValueError(f"method.num_classes must be >= 2, got {cfg.method.num_classes}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The official linear evaluations' training crop: RandomResizedCrop + horizontal flip."""
        return [ViewConfig(size=cfg.data.image_size, count=1, scale=[0.08, 1.0], flip_p=0.5, jitter_p=0.0,
                           grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)]

    def train(self, mode: bool = True) -> "LinearProbe":
        """The encoder stays in eval mode whatever the trainer asks: frozen means its batch norm
        statistics too."""
        super().train(mode)
        self.model.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Crops (B, 3, H, W) through the frozen encoder; cached features (B, d) as they are."""
        if x.dim() == 2:
            return x
        with torch.no_grad():
            return self.model.backbone(x)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        labels = batch["label"].to(batch["views"][0].device)
        if bool((labels >= self.cfg.method.num_classes).any()):
            raise ValueError(f"label {int(labels.max())} is outside method.num_classes="
                             f"{self.cfg.method.num_classes}")
        feats = self.features(batch["views"][0])
        logits = self.model.head(feats.float())
        return {"loss": F.cross_entropy(logits, labels), "embedding": feats.detach(),
                "train_top1": (logits.argmax(1) == labels).float().mean() * 100}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.head.parameters())}]

    def forward_buffers(self) -> list[torch.Tensor]:
        """Only the head's batch norm moves (the encoder is in eval mode)."""
        return [b for m in self.model.head.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                for b in m.buffers(recurse=False)]

    def encoder(self) -> nn.Module:
        return self.model.backbone

    def classifier(self) -> nn.Module:
        return self.model

    def training_loader(self, env: Any, local_batch: int) -> Any:
        if not self.cfg.method.cache_features:
            return None
        from sslforge.eval.linear import FeatureLoader

        return FeatureLoader.encode(self.model.backbone, self.cfg, env, local_batch)

    def evaluate(self, context: EvalContext) -> dict[str, float]:
        """Top-1 / top-5 on `data.val` (cached features on the fast path); at the run's last
        step, also recorded in the pretrained run's metrics.jsonl as its linear top-1."""
        from sslforge.eval.linear import score_val

        record = score_val(self, context)
        if context.step == context.total_steps and context.env.is_main:
            from sslforge.eval.run import append_metrics, run_dir_of

            append_metrics(run_dir_of(Path(self.cfg.method.source)), {
                "step": self.source_step, "eval": "linear", "linear_top1": record["val_top1"],
                "linear_top5": record["val_top5"], "linear_run": str(self.cfg.run_dir),
                "cache_features": bool(self.cfg.method.cache_features)})
        return record


def _feature_dim(encoder: nn.Module, image_size: int) -> int:
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        dim = encoder(torch.zeros(1, 3, image_size, image_size)).shape[1]
    encoder.train(was_training)
    return int(dim)
