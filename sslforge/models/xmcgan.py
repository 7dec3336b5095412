"""XMC-GAN's networks (Zhang et al., 2021; google-research/xmcgan_image_generation, nets/xmc_net.py).

Generator (attentional self-modulation), no spectral norm:

    c = [Dense(sentence) (z_dim), z]                            # the global condition
    x = Dense(z) -> 4 x 4;  GenBlocks with conditional BN of c  # up to cond_size (16 at 128 px)
    regions = 1x1 conv(x) -> word dim
    context = softmax_words(gamma_G cos(region, word)) @ norm(words)     # valid words only
    s = [context, tiled c]                                      # the spatial condition
    GenBlocks with local conditional BN of s (1x1 convs), s upsampled with x
    image = (tanh(conv(relu(localCBN(x, s)))) + 1) / 2          # in [0, 1]

Discriminator (ResNet with spectral norm, critic and encoder at once):

    x = OptimizedBlock(image); x = DiscBlocks(x)                # regions: the block at cond_size
    pooled = sum_{h, w} relu(x)                                 # the global image feature
    logit = Dense(pooled) + <pooled, Dense(sentence)>           # projection term
    regions = 1x1 conv(block at cond_size) -> word dim

Channel ratios (times gf_dim / df_dim) are the official ones at 128 and 256 px. Smaller images
(the built-in 16-64 px data) use the last log2(size/4) generator ratios of the 128 px net and
the first discriminator ratios of its downsampling blocks, then one block at 4 x 4 without
downsampling, as at 128 px; `cond_size` defaults to min(16, size / 4), so at least two
generator blocks are conditioned on word contexts. Kernels are initialised Glorot-normal
(truncated, as Flax's `glorot_normal`), biases at zero; batch norm has torch's momentum 0.1
(Flax's 0.9) and eps 1e-5.
"""
from __future__ import annotations

import math
from typing import NamedTuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

G_RATIOS = {128: (16, 8, 4, 2, 1), 256: (16, 8, 8, 4, 2, 1)}
D_RATIOS = {128: (2, 4, 8, 16, 16), 256: (2, 4, 8, 8, 16, 16)}  # the last block keeps its size
IMAGE_SIZES = (16, 32, 64, 128, 256)
TRUNCATED_STD = 0.87962566103423978  # std of a unit normal truncated at +-2 (JAX's correction)
Layer = TypeVar("Layer", nn.Conv2d, nn.Linear)


def check_sizes(image_size: int, cond_size: int | None) -> int:
    """The region grid side for `image_size` (ValueError naming what does not fit)."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"XMC-GAN builds images of {', '.join(map(str, IMAGE_SIZES))} px, "
                         f"data.image_size is {image_size}")
    cond = min(16, image_size // 4) if cond_size is None else cond_size
    if cond < 4 or cond > image_size // 4 or cond & (cond - 1):
        raise ValueError(f"method.cond_size={cond} must be a power of two from 4 to data.image_size/4 "
                         f"({image_size // 4})")
    return cond


def generator_ratios(image_size: int) -> tuple[int, ...]:
    """Width of each up-block's output, in units of gf_dim (one block per doubling from 4 px)."""
    blocks = int(math.log2(image_size // 4))
    return G_RATIOS.get(image_size, G_RATIOS[128][-blocks:])


def discriminator_ratios(image_size: int) -> tuple[int, ...]:
    """Width of each DiscBlock's output, in units of df_dim; all but the last halve the side."""
    if image_size in D_RATIOS:
        return D_RATIOS[image_size]
    halving = int(math.log2(image_size // 4)) - 1  # the optimised block halves once
    return D_RATIOS[128][:halving] + (D_RATIOS[128][halving - 1],)


def glorot_(layer: Layer) -> Layer:
    """A truncated Glorot-normal kernel and a zero bias (before any spectral norm wraps it)."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    std = math.sqrt(2.0 / (fan_in + fan_out)) / TRUNCATED_STD
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    return glorot_(nn.Conv2d(cin, cout, kernel, padding=kernel // 2))


def dense(cin: int, cout: int) -> nn.Linear:
    return glorot_(nn.Linear(cin, cout))


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def word_context(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """(B, d, h, w) context of each region: the normalised valid words, weighted by the softmax
    over words of gamma times their cosine with the region (the official `attention_for_g`)."""
    b, d, h, w = regions.shape
    r = F.normalize(regions.flatten(2).transpose(1, 2), dim=-1, eps=1e-6)  # (B, R, d)
    v = F.normalize(words, dim=-1, eps=1e-6)
    logits = (gamma * r @ v.transpose(1, 2)).masked_fill(~word_mask.bool()[:, None, :], -1e9)
    return (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, d, h, w)


# ----------------------------------------------------------------------------- generator

class ConditionalBatchNorm(nn.Module):
    """Batch norm without its own affine, then x (1 + gamma(c)) + beta(c): gamma and beta from a
    global condition (B, c) by dense layers, or from a spatial one (B, c, H, W) by 1x1 convs."""

    def __init__(self, channels: int, cond_dim: int, spatial: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False, eps=1e-5, momentum=0.1)
        self.gamma = conv(cond_dim, channels, 1) if spatial else dense(cond_dim, channels)
        self.beta = conv(cond_dim, channels, 1) if spatial else dense(cond_dim, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma(cond), self.beta(cond)
        if cond.ndim == 2:
            gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
        return self.norm(x) * (1.0 + gamma) + beta


class GenBlock(nn.Module):
    """CBN -> ReLU -> up -> 3x3 conv -> CBN -> ReLU -> 3x3 conv, plus up -> 1x1 conv. The first
    norm reads the condition at the input's size, the second at the output's (the same global
    condition for both, or the spatial one before and after upsampling)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, spatial: bool) -> None:
        super().__init__()
        self.norm1 = ConditionalBatchNorm(cin, cond_dim, spatial)
        self.conv1 = conv(cin, cout, 3)
        self.norm2 = ConditionalBatchNorm(cout, cond_dim, spatial)
        self.conv2 = conv(cout, cout, 3)
        self.skip = conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, cond_in: torch.Tensor, cond_out: torch.Tensor) -> torch.Tensor:
        h = self.conv1(upsample(F.relu(self.norm1(x, cond_in))))
        h = self.conv2(F.relu(self.norm2(h, cond_out)))
        return h + self.skip(upsample(x))


class Generator(nn.Module):
    """(z (B, z_dim), sentence (B, d), words (B, L, d), word_mask (B, L)) -> images in [0, 1]."""

    def __init__(self, image_size: int, text_dim: int, z_dim: int = 128, gf_dim: int = 96,
                 cond_size: int | None = None, gamma: float = 15.0) -> None:
        super().__init__()
        self.cond_size = check_sizes(image_size, cond_size)
        self.global_blocks = int(math.log2(self.cond_size // 4))
        self.gamma = gamma
        widths = [gf_dim * r for r in generator_ratios(image_size)]
        widths = [widths[0], *widths]
        global_dim, spatial_dim = 2 * z_dim, text_dim + 2 * z_dim
        self.sentence_proj = dense(text_dim, z_dim)
        self.stem = dense(z_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(
            GenBlock(widths[i], widths[i + 1], spatial_dim if i >= self.global_blocks else global_dim,
                     spatial=i >= self.global_blocks) for i in range(len(widths) - 1))
        self.region_proj = conv(widths[self.global_blocks], text_dim, 1)
        self.out_norm = ConditionalBatchNorm(widths[-1], spatial_dim, spatial=True)
        self.out_conv = conv(widths[-1], 3, 3)

    def forward(self, z: torch.Tensor, sentence: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([self.sentence_proj(sentence), z], dim=1)
        x = self.stem(z).view(len(z), -1, 4, 4)
        for block in self.blocks[:self.global_blocks]:
            x = block(x, cond, cond)
        context = word_context(self.region_proj(x), words, word_mask, self.gamma)
        spatial = torch.cat([context, cond[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        for block in self.blocks[self.global_blocks:]:
            larger = upsample(spatial)
            x = block(x, spatial, larger)
            spatial = larger
        x = self.out_conv(F.relu(self.out_norm(x, spatial)))
        return (torch.tanh(x) + 1.0) / 2.0


# ------------------------------------------------------------------------- discriminator

class DiscBlock(nn.Module):
    """ReLU -> 3x3 conv -> ReLU -> 3x3 conv (+ 2x2 average pool), plus a 1x1 conv shortcut when
    the width or the size changes; `first`: the optimised block on the image (no ReLU before
    the first conv, always pooled), as SN-GAN's."""

    def __init__(self, cin: int, cout: int, downsample: bool, first: bool = False) -> None:
        super().__init__()
        self.first, self.downsample = first, downsample or first
        self.conv1 = spectral_norm(conv(cin, cout, 3))
        self.conv2 = spectral_norm(conv(cout, cout, 3))
        self.skip = spectral_norm(conv(cin, cout, 1)) if (self.downsample or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        shortcut = self.skip(x) if self.skip is not None else x  # a 1x1 conv commutes with the pool
        if self.downsample:
            h, shortcut = F.avg_pool2d(h, 2), F.avg_pool2d(shortcut, 2)
        return h + shortcut


class CriticOutput(NamedTuple):
    logits: torch.Tensor  # (N,) real/fake scores, projection term included
    pooled: torch.Tensor  # (N, C) the global image feature
    regions: torch.Tensor  # (N, R, d) region features in the word space
    sentence: torch.Tensor  # (B, C) the projected sentences (N = k B images: k copies each)


class Discriminator(nn.Module):
    """Critic and image encoder; every conv and dense layer spectrally normalised."""

    def __init__(self, image_size: int, text_dim: int, df_dim: int = 96, cond_size: int | None = None) -> None:
        super().__init__()
        cond = check_sizes(image_size, cond_size)
        ratios = discriminator_ratios(image_size)
        widths = [df_dim, *(df_dim * r for r in ratios)]
        self.stem = DiscBlock(3, df_dim, downsample=True, first=True)
        self.blocks = nn.ModuleList(DiscBlock(widths[i], widths[i + 1], downsample=i < len(ratios) - 1)
                                    for i in range(len(ratios)))
        sides = [image_size // 2 ** min(i + 2, len(ratios)) for i in range(len(ratios))]
        self.region_block = max(i for i, side in enumerate(sides) if side == cond)  # the last at cond_size
        self.logit = spectral_norm(dense(widths[-1], 1))
        self.sentence_proj = spectral_norm(dense(text_dim, widths[-1]))
        self.region_proj = spectral_norm(conv(widths[self.region_block + 1], text_dim, 1))
        self.feature_dim = widths[-1]

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (N, C), the feature map at cond_size)."""
        x = self.stem(images)
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return F.relu(x).sum(dim=(2, 3)), maps[self.region_block]

    def forward(self, images: torch.Tensor, sentence: torch.Tensor) -> CriticOutput:
        pooled, region_map = self.trunk(images)
        projected = self.sentence_proj(sentence)
        if len(images) % len(sentence):
            raise ValueError(f"the critic got {len(images)} images for {len(sentence)} sentences; "
                             "images must be whole copies of the batch (real, then fake)")
        tiled = projected.repeat(len(images) // len(sentence), 1)
        logits = self.logit(pooled).squeeze(1) + (pooled * tiled).sum(dim=1)
        regions = self.region_proj(region_map).flatten(2).transpose(1, 2)
        return CriticOutput(logits, pooled, regions, projected)


def spectral_norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The power-iteration vectors of every spectrally normalised layer: a training-mode forward
    advances them in place (one iteration), an eval-mode one reads them."""
    return [buffer for name, buffer in module.named_buffers()
            if name.endswith(("weight.0._u", "weight.0._v"))]


__all__ = ["ConditionalBatchNorm", "CriticOutput", "DiscBlock", "Discriminator", "GenBlock", "Generator",
           "check_sizes", "discriminator_ratios", "generator_ratios", "spectral_norm_buffers", "word_context"]
