"""Fully Attentional Networks (FAN, Zhou et al., ICML 2022), the backbones of STL, from timm layers.

timm has no FAN, so the network is assembled here from the published architecture (NVlabs/FAN
models/fan.py and models/convnext_utils.py, read for facts; NVIDIA's licence is non-commercial, so
none of its code is copied):

    tokens = patch_embed(image) + fourier_position(grid)     # conv patch stem or ConvNeXt stages
    for each FAN block:                                       # token mixing, then channel processing
        tokens += drop_path(gamma1 * self_attention(LN(tokens)))
        tokens += drop_path(gamma2 * channel_processing(LN(tokens)))
    tokens = [cls] + tokens; 2 class-attention blocks (CaiT/XCiT, tokens_norm); final LN
    output: the class token (B, D); every patch token (B, gh, gw, D) for dense heads

- Patch embedding (ViT variants): stride-2 3x3 conv + BatchNorm layers with GELU between them,
  widths D/8, D/4, D/2, D for patch 16 (D/4, D/2, D for 8; D/4, D for 4, as published).
- Hybrid variants: a ConvNeXt stem (4x4 stride-4 patchify conv + LayerNorm) and the first two
  ConvNeXt stages (3 + 3 blocks, widths 128 and 256, layer scale 1e-6; the second halves the
  resolution), then a 2x2 stride-2 conv to the embedding: token stride 4 * 2 * 2 = 16. On small
  images the stride budget shrinks, the widths and depths do not: token stride 8 is a 2x2 stride-2
  patchify and the 2x2 projection; token stride 4 (the default on images of 64 px or less, so a
  32 px image gives 8x8 tokens) is the 2x2 stride-2 patchify and a 1x1 projection.
- Position: FAN's Fourier encoding, computed for each token grid, so every input size works:
  each coordinate normalised to (0, 2 pi] over its side, 32 sin/cos features per axis
  (temperature 10^4), [y features, x features] through a learned 1x1 projection.
- Channel processing ("attentive channel MLP"): per head, a sigmoid channel gate from the
  token-softmaxed query (a linear map of the input) against the token-softmaxed, channel-averaged
  input, times a learned per-head temperature, scales the output of an MLP whose hidden layer adds
  a depthwise-conv branch (dw 3x3, GELU, BatchNorm, dw 3x3; scaled by a learned gamma), then
  LayerNorm.
- Published settings: MLP ratio 4, qkv bias, layer scale eta = 1.0 in every block, tokens_norm,
  LayerNorm eps 1e-6 (the channel-processing LayerNorm keeps torch's 1e-5, as published); the
  drop-path rate is the same in every FAN block (none in the class-attention blocks or the
  ConvNeXt stem), as FAN's model builds it. Initialisation: Linear truncated normal .02 with zero
  bias, LayerNorm 1/0, class token truncated normal .02, depthwise convs N(0, 2 / fan_out) with
  fan_out = k * k * out / groups, ConvNeXt convs truncated normal .02, other convs torch's default.
- A side that is not a multiple of the token stride is zero-padded at the bottom and right, as the
  ViTs do, so the grid is ceil(side / stride).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, DropPath, LayerNorm, LayerNorm2d, trunc_normal_
from timm.models.convnext import ConvNeXtStage
from timm.models.xcit import ClassAttentionBlock

MLP_RATIO = 4.0
CLASS_ATTENTION_BLOCKS = 2
ETA = 1.0  # layer-scale init of every FAN and class-attention block
# ViT variants' conv stem: each stride-2 layer's width as a divisor of the embedding width
_PATCH_EMBED_DIVISORS: dict[int, tuple[int, ...]] = {16: (8, 4, 2, 1), 8: (4, 2, 1), 4: (4, 1)}
# hybrid variants: token stride -> (ConvNeXt patchify stride, projection stride); stage 2 gives x2
_HYBRID_STRIDES: dict[int, tuple[int, int]] = {16: (4, 2), 8: (2, 2), 4: (2, 1)}
_CONVNEXT_DEPTHS, _CONVNEXT_DIMS = (3, 3), (128, 256)
_CONVNEXT_LAYER_SCALE = 1e-6
TOKEN_STRIDES: tuple[int, ...] = tuple(sorted(_PATCH_EMBED_DIVISORS))

_norm = partial(nn.LayerNorm, eps=1e-6)


class FourierPositionEncoding(nn.Module):
    """FAN's position encoding for a gh x gw grid: sin/cos of normalised coordinates, projected."""

    def __init__(self, dim: int, features: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.features, self.temperature = features, temperature
        self.token_projection = nn.Conv2d(2 * features, dim, kernel_size=1)

    def _axis(self, n: int) -> torch.Tensor:
        """(n, features): [sin(c w_0), cos(c w_0), sin(c w_1), ...] for c = 2 pi i / n, i = 1..n."""
        device = self.token_projection.weight.device
        coord = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1e-6) * (2 * math.pi)
        pair = torch.div(torch.arange(self.features, device=device), 2, rounding_mode="floor")
        freq = self.temperature ** (2 * pair.float() / self.features)
        angle = coord[:, None] / freq
        return torch.stack([angle[:, 0::2].sin(), angle[:, 1::2].cos()], dim=-1).flatten(1)

    def forward(self, gh: int, gw: int) -> torch.Tensor:
        """(1, gh * gw, dim), row-major like the flattened tokens."""
        y = self._axis(gh)[:, None, :].expand(gh, gw, self.features)
        x = self._axis(gw)[None, :, :].expand(gh, gw, self.features)
        grid = torch.cat([y, x], dim=-1).permute(2, 0, 1)[None]
        return self.token_projection(grid).flatten(2).transpose(1, 2)


class DepthwiseConv(nn.Module):
    """dw 3x3 -> GELU -> BatchNorm -> dw 3x3 over the token grid: FAN's local mixing in the MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *grid)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.flatten(2).transpose(1, 2)


class DWConvMlp(nn.Module):
    """fc1 -> (+ gamma * depthwise-conv branch) -> fc2; FAN's MLP has no other activation."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.gamma = nn.Parameter(torch.ones(hidden))
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x + self.gamma * self.dwconv(x, grid))


class ChannelProcessing(nn.Module):
    """FAN's attentive channel processing: a per-channel sigmoid gate scales the MLP's output."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim, bias=True)
        self.mlp_v = DWConvMlp(dim, hidden)
        self.norm_v = nn.LayerNorm(dim)  # torch's eps 1e-5, as published

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q = self._heads(self.q(x)).softmax(dim=-2)  # over tokens
        k = self._heads(x).softmax(dim=-2).mean(dim=-1, keepdim=True)  # (B, h, N, 1)
        gate = torch.sigmoid(q.transpose(-1, -2) @ k) * self.temperature  # (B, h, d, 1)
        v = self._heads(self.norm_v(self.mlp_v(x, grid)))
        return (v * gate.transpose(-1, -2)).transpose(1, 2).flatten(2)


class FANBlock(nn.Module):
    """Token self-attention, then attentive channel processing, each with layer scale and drop-path."""

    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = _norm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = _norm(dim)
        self.mlp = ChannelProcessing(dim, num_heads, int(dim * MLP_RATIO))
        self.gamma1 = nn.Parameter(ETA * torch.ones(dim))
        self.gamma2 = nn.Parameter(ETA * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), grid))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout))


class ConvPatchEmbed(nn.Sequential):
    """The ViT variants' stem: stride-2 3x3 conv + BN layers, GELU between; (B, D, H/p, W/p)."""

    def __init__(self, dim: int, patch: int) -> None:
        widths = [dim // d for d in _PATCH_EMBED_DIVISORS[patch]]
        layers: list[nn.Module] = []
        for cin, cout in zip([3, *widths[:-1]], widths):
            layers += [_conv_bn(cin, cout), nn.GELU()]
        super().__init__(*layers[:-1])


class HybridEmbed(nn.Module):
    """The hybrid variants' stem: ConvNeXt patchify + two ConvNeXt stages, then a projection."""

    def __init__(self, dim: int, token_stride: int) -> None:
        super().__init__()
        patchify, project = _HYBRID_STRIDES[token_stride]
        (c1, c2), (d1, d2) = _CONVNEXT_DIMS, _CONVNEXT_DEPTHS
        stage = partial(ConvNeXtStage, ls_init_value=_CONVNEXT_LAYER_SCALE, norm_layer=LayerNorm2d,
                        norm_layer_cl=LayerNorm)
        self.stem = nn.Sequential(nn.Conv2d(3, c1, kernel_size=patchify, stride=patchify), LayerNorm2d(c1))
        self.stages = nn.Sequential(stage(c1, c1, stride=1, depth=d1), stage(c1, c2, stride=2, depth=d2))
        self.proj = nn.Conv2d(c2, dim, kernel_size=project, stride=project)
        for m in [*self.stem.modules(), *self.stages.modules()]:  # ConvNeXt's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stages(self.stem(x)))


class FAN(nn.Module):
    """FAN backbone: `forward(x)` -> (B, D) normalised class token; `forward_tokens(x)` -> (that,
    (B, gh, gw, D) normalised patch tokens); `token_stride` pixels per token side."""

    def __init__(self, patch_embed: nn.Module, dim: int, depth: int, num_heads: int, drop_path: float,
                 token_stride: int) -> None:
        super().__init__()
        self.embed_dim = self.num_features = dim
        self.token_stride = token_stride
        self.patch_embed = patch_embed
        self.pos_embed = FourierPositionEncoding(dim)
        self.blocks = nn.ModuleList([FANBlock(dim, num_heads, drop_path) for _ in range(depth)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(dim, num_heads, mlp_ratio=MLP_RATIO, qkv_bias=True, norm_layer=_norm,
                                eta=ETA, tokens_norm=True)
            for _ in range(CLASS_ATTENTION_BLOCKS)])
        self.norm = _norm(dim)
        self.apply(_init_weights)
        trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """FAN's recipe (timm's optimiser factory) keeps the class token out of weight decay."""
        return {"cls_token"}

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _pad_to_multiple(x, self.token_stride)
        fmap = self.patch_embed(x)
        b, dim, gh, gw = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2) + self.pos_embed(gh, gw)
        for block in self.blocks:
            tokens = block(tokens, (gh, gw))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        for block in self.cls_attn_blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1:].reshape(b, gh, gw, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]


def _pad_to_multiple(x: torch.Tensor, stride: int) -> torch.Tensor:
    pad_h, pad_w = -x.shape[-2] % stride, -x.shape[-1] % stride
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    """FAN's: Linear truncated normal .02 / zero bias, LayerNorm 1/0, depthwise convs He-normal
    over fan_out; the ConvNeXt stem keeps its own, other convs keep torch's default."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, DepthwiseConv):
        for conv in (m.conv1, m.conv2):
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            conv.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)


def build_fan(dim: int, depth: int, num_heads: int, token_stride: int, hybrid: bool,
              drop_path: float = 0.0) -> FAN:
    """A FAN with a conv patch stem (`hybrid` False) or a ConvNeXt stem, tokens every `token_stride`
    pixels (4, 8 or 16)."""
    if token_stride not in TOKEN_STRIDES:
        raise ValueError(f"FAN token stride {token_stride} is not one of {', '.join(map(str, TOKEN_STRIDES))}")
    embed = HybridEmbed(dim, token_stride) if hybrid else ConvPatchEmbed(dim, token_stride)
    return FAN(embed, dim, depth, num_heads, drop_path, token_stride)
