"""Multi-crop forward (DINO, SwAV): crops come at a few sizes, and a batch must share one size.

Consecutive crops of equal size are concatenated and run through the backbone in one forward
(2 global + N local crops: two forwards), as DINO's MultiCropWrapper; the features come back in
crop order, so crop i of a batch of B is rows [i * B, (i + 1) * B) when every crop has B images.
"""
from __future__ import annotations

from itertools import groupby
from typing import Sequence

import torch
import torch.nn as nn

from sslforge.config import ViewConfig


def forward_multicrop(backbone: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Features of every crop, one backbone forward per run of consecutive equal-size crops."""
    if not crops:
        raise ValueError("forward_multicrop needs at least one crop")
    runs = groupby(crops, key=lambda crop: tuple(crop.shape[-2:]))
    return torch.cat([backbone(torch.cat(list(run))) for _, run in runs])


def require_global_crops(method: str, views: Sequence[ViewConfig], needed: int) -> None:
    """Methods whose targets come from the first `needed` crops (DINO's teacher, SwAV's codes)
    refuse views that give fewer crops."""
    count = sum(v.count for v in views)
    if count < needed:
        raise ValueError(f"{method} needs at least {needed} crops (the global ones first), "
                         f"data.views gives {count}")
