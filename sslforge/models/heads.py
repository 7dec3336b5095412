"""Heads shared by methods: projection MLPs (SimCLR, MoCo v2/v3, BYOL, SimSiam, ...)."""
from __future__ import annotations

import torch.nn as nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
        last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a final linear (optionally followed by an affine-free BN)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
