"""Backbones: torchvision ResNets and timm Vision Transformers, each returning (B, dim) features.

`model.backbone` names one of `BACKBONES`; the other `model.*` keys shape it:
- ResNets (torchvision, classifier removed). On images of 64 px or less the ImageNet stem (7x7
  stride-2 conv + max-pool) throws away most of the spatial resolution, so solo-learn and the
  SimCLR CIFAR recipe swap it for a 3x3 stride-1 conv and no pool; `small_stem` None makes that
  choice from the image size. torchvision's ResNets have no stochastic depth, so `drop_path` and
  the other ViT keys are refused rather than silently ignored.
- ViTs (timm's VisionTransformer, built from the hyperparameters DINO and MoCo v3 use: depth 12,
  MLP ratio 4, qkv bias, LayerNorm eps 1e-6). The output is the normalised class token. Patch 16,
  or 4 on images of 64 px or less so the built-in 16-32 px data still makes 16-64 tokens.
  `dynamic_img_size` lets one model take multi-crop's several crop sizes: the position embedding
  is resampled (bicubic) to each crop's grid, and a crop whose side is not a multiple of the patch
  is zero-padded at the bottom/right. `drop_path` is the stochastic-depth rate of the last block
  (linear from 0, as DINO). `vit_init` picks the published initialisation:
  timm (timm's: truncated normal .02 Linear, class token N(0, 1e-6)), dino (the same with the class
  token truncated normal .02, as dino's vision_transformer.py) or moco (moco-v3's vits.py:
  xavier-uniform Linear with q, k and v treated separately, patch projection uniform
  +-sqrt(6 / (3 p^2 + D))). MoCo v3's ViT also sets `vit_frozen_patch_embed` (that random patch
  projection, frozen) and `vit_sincos_pos_embed` (the fixed 2-D sin-cos position embedding).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
import torch.nn as nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, ResNet

if TYPE_CHECKING:
    from sslforge.config import ModelConfig

SMALL_IMAGE_MAX = 64
SMALL_IMAGE_PATCH = 4
PATCH = 16


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


class _ViTSize(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int


_VITS: dict[str, _ViTSize] = {
    "vit_tiny": _ViTSize(192, 12, 3),
    "vit_small": _ViTSize(384, 12, 6),
    "vit_base": _ViTSize(768, 12, 12),
}

BACKBONES: tuple[str, ...] = (*_RESNETS, *_VITS)
VIT_INITS: tuple[str, ...] = ("timm", "dino", "moco")


def build_backbone(model_cfg: ModelConfig | Any, image_size: int) -> tuple[nn.Module, int]:
    """(backbone producing (B, dim) features for crops of any size, dim) from `cfg.model`."""
    check_model_config(model_cfg, image_size)
    if model_cfg.backbone in _RESNETS:
        return _build_resnet(model_cfg.backbone, image_size, model_cfg.small_stem)
    return _build_vit(model_cfg, image_size)


def check_model_config(model_cfg: ModelConfig | Any, image_size: int) -> None:
    """Raises ValueError naming the key for an unknown backbone or a key it cannot use; cheap
    (builds nothing), so configuration checks can call it before any rank starts."""
    name = model_cfg.backbone
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (model.backbone); known: {', '.join(BACKBONES)}")
    if name in _RESNETS:
        _check_resnet_keys(model_cfg)
    else:
        _check_vit_keys(model_cfg, image_size)


def _check_resnet_keys(model_cfg: ModelConfig | Any) -> None:
    vit_only = {"patch_size": model_cfg.patch_size is not None,
                "num_heads": model_cfg.num_heads is not None,
                "drop_path": model_cfg.drop_path != 0.0,
                "vit_init": model_cfg.vit_init != "timm",
                "vit_frozen_patch_embed": model_cfg.vit_frozen_patch_embed,
                "vit_sincos_pos_embed": model_cfg.vit_sincos_pos_embed}
    for key, is_set in vit_only.items():
        if is_set:
            raise ValueError(f"model.{key} applies to ViT backbones only, not '{model_cfg.backbone}' "
                             "(torchvision ResNets have no stochastic depth, patches or heads)")


def _check_vit_keys(model_cfg: ModelConfig | Any, image_size: int) -> None:
    size, patch = _VITS[model_cfg.backbone], vit_patch_size(model_cfg, image_size)
    if model_cfg.small_stem is not None:
        raise ValueError(f"model.small_stem applies to ResNets only, not '{model_cfg.backbone}' "
                         "(a ViT on small images uses a small model.patch_size)")
    if patch <= 0 or image_size % patch:
        raise ValueError(f"model.patch_size {patch} must be positive and divide data.image_size {image_size}")
    heads = model_cfg.num_heads
    if heads is not None and (heads <= 0 or size.embed_dim % heads):
        raise ValueError(f"model.num_heads {heads} must divide the embedding width {size.embed_dim} "
                         f"of {model_cfg.backbone}")
    if not 0.0 <= model_cfg.drop_path < 1.0:
        raise ValueError(f"model.drop_path {model_cfg.drop_path} must be in [0, 1)")
    if model_cfg.vit_init not in VIT_INITS:
        raise ValueError(f"model.vit_init '{model_cfg.vit_init}' is not one of {', '.join(VIT_INITS)}")


def vit_patch_size(model_cfg: ModelConfig | Any, image_size: int) -> int:
    """`model.patch_size`, or 16 (4 on images of 64 px or less: enough tokens on tiny data)."""
    if model_cfg.patch_size is not None:
        return model_cfg.patch_size
    return SMALL_IMAGE_PATCH if image_size <= SMALL_IMAGE_MAX else PATCH


def _build_resnet(name: str, image_size: int, small_stem: bool | None) -> tuple[nn.Module, int]:
    net = _RESNETS[name](weights=None) if name != "resnet10" else _RESNETS[name]()
    if small_stem if small_stem is not None else image_size <= SMALL_IMAGE_MAX:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _build_vit(model_cfg: ModelConfig | Any, image_size: int) -> tuple[nn.Module, int]:
    # timm is imported here, not at the top: configuration checks import this module, and the
    # CLI should not pay timm's import time to list recipes or reject a typo.
    from timm.models.vision_transformer import VisionTransformer

    size = _VITS[model_cfg.backbone]
    patch = vit_patch_size(model_cfg, image_size)
    net = VisionTransformer(
        img_size=image_size, patch_size=patch, num_classes=0, global_pool="token",
        embed_dim=size.embed_dim, depth=size.depth, num_heads=model_cfg.num_heads or size.num_heads,
        mlp_ratio=4.0, qkv_bias=True, dynamic_img_size=True, dynamic_img_pad=True,
        drop_path_rate=model_cfg.drop_path, weight_init="moco" if model_cfg.vit_init == "moco" else "")
    if model_cfg.vit_init == "dino":
        nn.init.trunc_normal_(net.cls_token, std=0.02)
    if model_cfg.vit_init == "moco" or model_cfg.vit_frozen_patch_embed:
        _moco_patch_embed_init(net.patch_embed.proj, patch, size.embed_dim)
    if model_cfg.vit_frozen_patch_embed:
        net.patch_embed.proj.requires_grad_(False)
    if model_cfg.vit_sincos_pos_embed:
        _fix_sincos_pos_embed(net)
    return net, size.embed_dim


@torch.no_grad()
def _moco_patch_embed_init(proj: nn.Conv2d, patch: int, embed_dim: int) -> None:
    """MoCo v3's patch projection: xavier-uniform over (3 p^2 inputs, D outputs), zero bias."""
    bound = math.sqrt(6.0 / (3 * patch * patch + embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)


@torch.no_grad()
def _fix_sincos_pos_embed(net: nn.Module) -> None:
    """The fixed 2-D sin-cos position embedding of MoCo v3 (temperature 10^4; channels
    [sin(y w), cos(y w), sin(x w), cos(x w)] with y the patch row, x its column; zero for the
    class token), frozen."""
    from timm.layers import build_sincos2d_pos_embed

    grid = list(net.patch_embed.grid_size)
    # interleave_sin_cos stacks sin, cos per coordinate: the channel order of moco-v3's vits.py
    patches = build_sincos2d_pos_embed(grid, net.embed_dim, temperature=10000.0, interleave_sin_cos=True)
    cls = torch.zeros(1, net.embed_dim)
    net.pos_embed.copy_(torch.cat([cls, patches])[None])
    net.pos_embed.requires_grad_(False)
