"""Classifiers for supervised training: a backbone, a linear head on its class token and, for
token labeling (STL), a linear head on every patch token.

`forward` gives the class-token logits (B, K), what top-1 and the robustness evaluation score;
`forward_dense` gives both heads' logits, the patch tokens' on their grid (B, gh, gw, K), so a
token label belongs to a place in the image. Heads start as timm's: truncated normal (std .02)
weights, zero bias.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from sslforge.models.tokens import forward_tokens


class DenseLogits(NamedTuple):
    cls: torch.Tensor  # (B, K): the class token's
    tokens: torch.Tensor  # (B, gh, gw, K): each patch token's


def _head(dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class Classifier(nn.Module):
    """backbone -> class head; with `dense`, also a per-token head (STL's auxiliary head)."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, dense: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = _head(dim, num_classes)
        self.token_head = _head(dim, num_classes) if dense else None

    @property
    def dense(self) -> bool:
        """Whether `forward_dense` (per-token logits) is available."""
        return self.token_head is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_head is None:
            return self.head(self.backbone(x))
        return self.forward_dense(x).cls

    def forward_dense(self, x: torch.Tensor) -> DenseLogits:
        if self.token_head is None:
            raise TypeError("this classifier has no per-token head (built with dense=False)")
        cls, tokens = forward_tokens(self.backbone, x)
        return DenseLogits(self.head(cls), self.token_head(tokens))


__all__ = ["Classifier", "DenseLogits"]
