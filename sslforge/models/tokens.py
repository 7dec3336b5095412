"""Per-token outputs of a transformer backbone, for heads that classify every patch (STL).

`forward_tokens(backbone, x)` gives the class token (B, D), the same tensor `backbone(x)` returns,
and every patch token (B, gh, gw, D) in image layout (row i, column j covers pixels
[i s, (i + 1) s) x [j s, (j + 1) s) for s = `token_stride(backbone)`), both after the final norm.
It knows the FANs (models/fan.py) and timm's VisionTransformer as `build_backbone` makes it (class
token first, then the patches row-major); anything else, a ResNet say, has no tokens: TypeError.

timm and fan.py are imported inside the functions: methods import this module, and the method
registry is imported by the CLI's configuration checks, which should not pay timm's import time.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def forward_tokens(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token (B, D), patch tokens (B, gh, gw, D)) of `backbone` on images `x`."""
    from sslforge.models.fan import FAN

    if isinstance(backbone, FAN):
        return backbone.forward_tokens(x)
    vit = _class_token_vit(backbone)
    gh, gw = vit.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    tokens = vit.forward_features(x)
    patches = tokens[:, vit.num_prefix_tokens:]
    return tokens[:, 0], patches.reshape(patches.shape[0], gh, gw, patches.shape[-1])


def token_stride(backbone: nn.Module) -> int:
    """Pixels per token side: the patch size of a ViT, the token stride of a FAN."""
    from sslforge.models.fan import FAN

    if isinstance(backbone, FAN):
        return backbone.token_stride
    ph, pw = _class_token_vit(backbone).patch_embed.patch_size
    if ph != pw:
        raise TypeError(f"token_stride needs square patches, {type(backbone).__name__} has {ph}x{pw}")
    return ph


def _class_token_vit(backbone: nn.Module) -> nn.Module:
    """`backbone` as a timm ViT whose output is its class token, or a TypeError naming it."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"per-token outputs need a FAN or a timm VisionTransformer backbone, "
                        f"not {type(backbone).__name__}")
    if backbone.cls_token is None or backbone.global_pool != "token":
        raise TypeError(f"{type(backbone).__name__} does not output its class token "
                        f"(global_pool '{backbone.global_pool}'); forward_tokens needs one")
    return backbone
