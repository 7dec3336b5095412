"""Backbones: torchvision ResNets with the classifier removed, and a small-image stem.

On images of 64 px or less the ImageNet stem (7x7 stride-2 conv + max-pool) throws away most of
the spatial resolution, so solo-learn and the SimCLR CIFAR recipe swap it for a 3x3 stride-1 conv
and no pool. `small_stem=None` makes that choice from the image size.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, ResNet

SMALL_IMAGE_MAX = 64


def _resnet10(**kwargs) -> ResNet:
    """ResNet-18 with one block per stage: the CPU-sized backbone of the built-in demo."""
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


_RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet10": _resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


def build_backbone(name: str, image_size: int, small_stem: bool | None = None) -> tuple[nn.Module, int]:
    """Returns (backbone producing (B, dim) features, dim)."""
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone '{name}'; known: {', '.join(sorted(_RESNETS))}")
    net = _RESNETS[name](weights=None) if name != "resnet10" else _RESNETS[name]()
    if small_stem if small_stem is not None else image_size <= SMALL_IMAGE_MAX:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim
