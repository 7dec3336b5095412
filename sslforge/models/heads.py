"""Heads shared by methods: projection and prediction MLPs (SimCLR, MoCo v2/v3, BYOL, SimSiam)
and DINO's head (MLP, L2-normalised bottleneck, weight-normalised prototypes layer)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, batch_norm: bool = True,
        hidden_bias: bool = False, last_bn: bool = False,
        act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """`num_layers - 1` Linear(+BN)+act blocks, then a final Linear (with a bias unless `last_bn`),
    then an affine-free BatchNorm1d if `last_bn` (MoCo v3, SimSiam). A hidden Linear followed by
    BN needs no bias (SimCLR, MoCo v3); BYOL and DINO keep one (`hidden_bias`)."""
    if num_layers < 1:
        raise ValueError(f"an MLP needs num_layers >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=hidden_bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(act())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head: GELU MLP to a bottleneck, L2-normalised, then `last_layer`, a
    weight-normalised Linear without bias (each output row is g * v / ||v||) whose magnitude g
    starts at 1 and, with `norm_last_layer`, stays frozen there (the paper's stabiliser).

    The weight norm is torch's parametrization: `last_layer.parametrizations.weight.original0`
    is g (out_dim, 1), `.original1` is v; it survives deepcopy (the teacher) and state_dict."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm=batch_norm,
                       hidden_bias=True, act=nn.GELU)
        self.mlp.apply(_trunc_normal_init)
        # v keeps nn.Linear's default init, as in DINO (its init runs before this layer exists)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def _trunc_normal_init(module: nn.Module) -> None:
    """DINO's Linear init: truncated normal with std .02 (bounds +-2, absolute), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
