"""Backbones: torchvision ResNets, timm Vision Transformers and FANs, each returning (B, dim) features.

`model.backbone` names one of `BACKBONES`; the other `model.*` keys shape it:
- ResNets (torchvision, classifier removed). On images of 64 px or less the ImageNet stem (7x7
  stride-2 conv + max-pool) throws away most of the spatial resolution, so solo-learn and the
  SimCLR CIFAR recipe swap it for a 3x3 stride-1 conv and no pool; `small_stem` None makes that
  choice from the image size. torchvision's ResNets have no stochastic depth, so `drop_path` and
  the other ViT and FAN keys are refused rather than silently ignored.
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
- FANs (Fully Attentional Networks, STL's backbones; models/fan.py builds them from timm layers):
  fan_tiny/small/base are NVlabs/FAN's fan_tiny_12_p16_224, fan_small_12_p16_224 and
  fan_base_18_p16_224 (a convolutional patch stem), fan_*_hybrid its fan_tiny_8_p4_hybrid,
  fan_small_12_p4_hybrid (10 blocks, as built there) and fan_base_16_p4_hybrid (a ConvNeXt stem).
  The output is the normalised class token after the class-attention blocks. `patch_size` is the
  token stride, 4, 8 or 16 (None: 16, or 4 on images of 64 px or less, as for the ViTs; the hybrid
  then shrinks its ConvNeXt strides, see fan.py); `drop_path` is the rate of every FAN block, as
  FAN builds it; `num_heads` overrides the variant's heads; the `vit_*` keys are refused.
- `depth` (ViTs and FANs) overrides the number of blocks, so CPU presets can run shallow models.
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


class _FANSize(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    hybrid: bool  # ConvNeXt stem instead of the convolutional patch stem


# NVlabs/FAN models/fan.py (the STL repository builds the same)
_FANS: dict[str, _FANSize] = {
    "fan_tiny": _FANSize(192, 12, 4, False),
    "fan_small": _FANSize(384, 12, 8, False),
    "fan_base": _FANSize(448, 18, 8, False),
    "fan_tiny_hybrid": _FANSize(192, 8, 8, True),
    "fan_small_hybrid": _FANSize(384, 10, 8, True),
    "fan_base_hybrid": _FANSize(448, 16, 8, True),
}
FAN_TOKEN_STRIDES: tuple[int, ...] = (4, 8, 16)  # models/fan.py's stems (no timm import here)

BACKBONES: tuple[str, ...] = (*_RESNETS, *_VITS, *_FANS)
VIT_INITS: tuple[str, ...] = ("timm", "dino", "moco")


def build_backbone(model_cfg: ModelConfig | Any, image_size: int) -> tuple[nn.Module, int]:
    """(backbone producing (B, dim) features for crops of any size, dim) from `cfg.model`."""
    check_model_config(model_cfg, image_size)
    if model_cfg.backbone in _RESNETS:
        return _build_resnet(model_cfg.backbone, image_size, model_cfg.small_stem)
    if model_cfg.backbone in _FANS:
        return _build_fan(model_cfg, image_size)
    return _build_vit(model_cfg, image_size)


def check_model_config(model_cfg: ModelConfig | Any, image_size: int) -> None:
    """Raises ValueError naming the key for an unknown backbone or a key it cannot use; cheap
    (builds nothing), so configuration checks can call it before any rank starts."""
    name = model_cfg.backbone
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (model.backbone); known: {', '.join(BACKBONES)}")
    if name in _RESNETS:
        _check_resnet_keys(model_cfg)
    elif name in _FANS:
        _check_fan_keys(model_cfg, image_size)
    else:
        _check_vit_keys(model_cfg, image_size)


def _check_resnet_keys(model_cfg: ModelConfig | Any) -> None:
    transformer_only = {"patch_size": model_cfg.patch_size is not None,
                        "num_heads": model_cfg.num_heads is not None,
                        "depth": model_cfg.depth is not None,
                        "drop_path": model_cfg.drop_path != 0.0,
                        "vit_init": model_cfg.vit_init != "timm",
                        "vit_frozen_patch_embed": model_cfg.vit_frozen_patch_embed,
                        "vit_sincos_pos_embed": model_cfg.vit_sincos_pos_embed}
    _refuse_set_keys(model_cfg.backbone, transformer_only, "torchvision's ResNets have no stochastic depth, "
                     "patches, heads, block count or ViT options")


def _refuse_set_keys(backbone: str, keys: dict[str, bool], why: str) -> None:
    """A ValueError naming the first key set (True) that `backbone` cannot use, and why."""
    for key, is_set in keys.items():
        if is_set:
            raise ValueError(f"model.{key} does not apply to '{backbone}' ({why})")


def _check_transformer_keys(model_cfg: ModelConfig | Any, image_size: int, embed_dim: int) -> None:
    """The keys ViTs and FANs share."""
    patch = vit_patch_size(model_cfg, image_size)
    if model_cfg.small_stem is not None:
        raise ValueError(f"model.small_stem applies to ResNets only, not '{model_cfg.backbone}' "
                         "(a ViT or FAN on small images uses a small model.patch_size)")
    if patch <= 0 or image_size % patch:
        raise ValueError(f"model.patch_size {patch} must be positive and divide data.image_size {image_size}")
    heads = model_cfg.num_heads
    if heads is not None and (heads <= 0 or embed_dim % heads):
        raise ValueError(f"model.num_heads {heads} must divide the embedding width {embed_dim} "
                         f"of {model_cfg.backbone}")
    if model_cfg.depth is not None and model_cfg.depth <= 0:
        raise ValueError(f"model.depth {model_cfg.depth} must be a positive number of blocks")
    if not 0.0 <= model_cfg.drop_path < 1.0:
        raise ValueError(f"model.drop_path {model_cfg.drop_path} must be in [0, 1)")


def _check_vit_keys(model_cfg: ModelConfig | Any, image_size: int) -> None:
    _check_transformer_keys(model_cfg, image_size, _VITS[model_cfg.backbone].embed_dim)
    if model_cfg.vit_init not in VIT_INITS:
        raise ValueError(f"model.vit_init '{model_cfg.vit_init}' is not one of {', '.join(VIT_INITS)}")


def _check_fan_keys(model_cfg: ModelConfig | Any, image_size: int) -> None:
    name = model_cfg.backbone
    _check_transformer_keys(model_cfg, image_size, _FANS[name].embed_dim)
    stride = vit_patch_size(model_cfg, image_size)
    if stride not in FAN_TOKEN_STRIDES:
        raise ValueError(f"model.patch_size {stride} of '{name}' must be one of "
                         f"{', '.join(map(str, FAN_TOKEN_STRIDES))} (FAN's convolutional stems)")
    vit_only = {"vit_init": model_cfg.vit_init != "timm",
                "vit_frozen_patch_embed": model_cfg.vit_frozen_patch_embed,
                "vit_sincos_pos_embed": model_cfg.vit_sincos_pos_embed}
    _refuse_set_keys(name, vit_only, "ViT options: FAN has its own initialisation and Fourier position encoding")


def vit_patch_size(model_cfg: ModelConfig | Any, image_size: int) -> int:
    """`model.patch_size` (a FAN's token stride), or 16 (4 on images of 64 px or less: enough
    tokens on tiny data)."""
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
        embed_dim=size.embed_dim, depth=model_cfg.depth or size.depth,
        num_heads=model_cfg.num_heads or size.num_heads,
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


def _build_fan(model_cfg: ModelConfig | Any, image_size: int) -> tuple[nn.Module, int]:
    # fan.py imports timm: imported here for the reason _build_vit gives
    from sslforge.models.fan import build_fan

    size = _FANS[model_cfg.backbone]
    net = build_fan(size.embed_dim, model_cfg.depth or size.depth, model_cfg.num_heads or size.num_heads,
                    vit_patch_size(model_cfg, image_size), size.hybrid, model_cfg.drop_path)
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
