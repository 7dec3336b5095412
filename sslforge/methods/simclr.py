"""SimCLR (Chen et al., 2020): two augmented views, a projection head, NT-Xent over the batch.

    h1, h2 = f(aug1(x)), f(aug2(x))
    z1, z2 = g(h1), g(h2)
    loss = nt_xent(z1, z2, tau)      # negatives: the other 2N-2 views of the global batch

`method.loss` swaps the objective for one of the InfoNCE variants on the same spine, each
distributed over the global batch (`sslforge.losses`):
- `dcl` / `dclw`: decoupled contrastive learning, the positive out of the denominator (DCLW: the
  positive weighted by a von Mises-Fisher term, `dclw_sigma`);
- `debiased`: Chuang et al.'s negative term corrected by the class prior `tau_plus`;
- `fnc`: false-negative cancellation; `fnc_support_views` extra crops of each image find its
  false negatives (top `fnc_topk` above `fnc_threshold`), then eliminated from the denominator
  or attracted as positives (`fnc_mode`);
- `directclr`: InfoNCE (the official cross-view form) on the first `directclr_dims` dimensions
  of the backbone output, with no projector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.losses import dcl_loss, debiased_nt_xent, directclr_loss, fnc_loss, nt_xent
from sslforge.methods.base import Method
from sslforge.models.backbones import build_backbone
from sslforge.models.heads import mlp

ANCHOR_VIEWS = 2


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    temperature: float = 0.1
    proj_layers: int = 2  # the paper's v1 head; SimCLR v2 uses 3
    loss: str = "nt_xent"  # nt_xent | dcl | dclw | debiased | fnc | directclr
    dclw_sigma: float = 0.5  # dclw: the vMF weighting's sigma
    tau_plus: float = 0.1  # debiased: the class prior
    fnc_support_views: int = 8  # fnc: crops per image that only find false negatives
    fnc_topk: int = 10
    fnc_threshold: float = 0.7
    fnc_mode: str = "attraction"  # attraction | elimination
    directclr_dims: int = 360  # directclr: the first d dimensions of the representation


# Each loss from (method config, projections per crop, representations per crop).
LOSSES: dict[str, Callable[[DictConfig, list[torch.Tensor], list[torch.Tensor]], torch.Tensor]] = {
    "nt_xent": lambda m, z, h: nt_xent(z[0], z[1], m.temperature),
    "dcl": lambda m, z, h: dcl_loss(z[0], z[1], m.temperature),
    "dclw": lambda m, z, h: dcl_loss(z[0], z[1], m.temperature, weighted=True, sigma=m.dclw_sigma),
    "debiased": lambda m, z, h: debiased_nt_xent(z[0], z[1], m.temperature, m.tau_plus),
    "fnc": lambda m, z, h: fnc_loss(z, m.temperature, m.fnc_topk, m.fnc_threshold, m.fnc_mode),
    "directclr": lambda m, z, h: directclr_loss(h[0], h[1], m.directclr_dims, m.temperature),
}


class SimCLR(Method):
    config_class = SimCLRConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.backbone, dim = build_backbone(cfg.model, cfg.data.image_size)
        if cfg.method.loss == "directclr":
            if cfg.method.directclr_dims > dim:
                raise ValueError(f"method.directclr_dims={cfg.method.directclr_dims} exceeds the backbone's "
                                 f"{dim}-d output")
            self.projector: nn.Module = nn.Identity()  # DirectCLR trains the representation directly
        else:
            self.projector = mlp(dim, cfg.model.proj_hidden_dim, cfg.model.proj_output_dim, cfg.method.proj_layers)
        self.temperature = cfg.method.temperature

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        if m.loss not in LOSSES:
            raise ValueError(f"method.loss={m.loss!r} is not one of {', '.join(LOSSES)}")
        if m.fnc_mode not in ("attraction", "elimination"):
            raise ValueError(f"method.fnc_mode={m.fnc_mode!r} must be attraction or elimination")
        crops = sum(v.count for v in (list(cfg.data.views) or cls.views(cfg)))
        wanted = ANCHOR_VIEWS + (m.fnc_support_views if m.loss == "fnc" else 0)
        if m.loss == "fnc" and m.fnc_support_views < 1:
            raise ValueError(f"method.fnc_support_views must be >= 1 for method.loss=fnc, got {m.fnc_support_views}")
        if crops != wanted:
            raise ValueError(f"method.loss={m.loss} takes {wanted} crops per image, the counts of data.views give {crops}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """Two crops from the same distribution: the paper's symmetric augmentation (FNC: its
        support views too, from the same distribution)."""
        small = cfg.data.image_size <= 64
        support = cfg.method.fnc_support_views if cfg.method.loss == "fnc" else 0
        return [ViewConfig(size=cfg.data.image_size, count=ANCHOR_VIEWS + support, blur_p=0.0 if small else 0.5)]

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        crops = batch["views"]
        h = self.backbone(torch.cat(crops))
        z = self.projector(h)
        loss = LOSSES[self.cfg.method.loss](self.cfg.method, list(z.chunk(len(crops))), list(h.chunk(len(crops))))
        return {"loss": loss, "embedding": h[:ANCHOR_VIEWS * len(crops[0])].detach()}

    def encoder(self) -> nn.Module:
        return self.backbone
