"""Convolutional encoder and decoder of a VAE, the layout of AntixK/PyTorch-VAE's VanillaVAE.

Encoder: one stride-2 3x3 conv + BN + LeakyReLU per entry of `hidden_dims` (S -> S / 2^n),
flattened, then a linear layer to (mu, logvar). Decoder: the mirror image, a linear layer to
the smallest feature map, a stride-2 3x3 transposed conv + BN + LeakyReLU per level, and a 3x3
conv to 3 channels (convolutions followed by batch norm have no bias: its shift
replaces it). The decoder returns logits: the likelihood applies the sigmoid (a Bernoulli
from its logits, a Gaussian's mean in (0, 1)); AntixK's tanh output is for [-1, 1] images.

The networks take pixels in [0, 1]; the data pipeline hands ImageNet-normalised crops, which
`unit_pixels` turns back (exact up to float rounding), and `PosteriorMean` is the encoder that
the kNN evaluation and the export see: normalised images in, mu out, as every other encoder.
"""
from __future__ import annotations

from itertools import pairwise
from typing import Sequence

import torch
import torch.nn as nn

from sslforge.data_pipeline.views import unit_pixels


def feature_side(image_size: int, hidden_dims: Sequence[int]) -> int:
    """The side of the encoder's last feature map; ValueError when the image does not halve
    evenly once per level."""
    levels = len(hidden_dims)
    if levels == 0 or image_size % (2 ** levels) or image_size < 2 ** levels:
        raise ValueError(f"method.hidden_dims has {levels} stride-2 levels, so data.image_size={image_size} "
                         f"must be a positive multiple of {2 ** max(levels, 1)}")
    return image_size // 2 ** levels


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU())


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU())


class ConvEncoder(nn.Module):
    """[0, 1] images (B, 3, S, S) -> (mu, logvar), each (B, latent_dim); logvar unclamped (the
    losses clamp it where they exponentiate)."""

    def __init__(self, image_size: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        side = feature_side(image_size, hidden_dims)
        self.features = nn.Sequential(*(_down(a, b) for a, b in pairwise([3, *hidden_dims])), nn.Flatten())
        self.posterior = nn.Linear(hidden_dims[-1] * side * side, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(self.features(x)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """z (B, latent_dim) -> logits (B, 3, S, S) of the pixels' distribution."""

    def __init__(self, image_size: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.side = feature_side(image_size, hidden_dims)
        widths = list(reversed(hidden_dims))
        self.start = nn.Linear(latent_dim, widths[0] * self.side * self.side)
        self.upsample = nn.Sequential(*(_up(a, b) for a, b in pairwise(widths)),
                                      _up(widths[-1], widths[-1]))
        self.to_pixels = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.start(z).view(len(z), -1, self.side, self.side)
        return self.to_pixels(self.upsample(h))


class PosteriorMean(nn.Module):
    """The exported encoder: ImageNet-normalised images (the evaluation transform's) -> mu."""

    def __init__(self, encoder: ConvEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(unit_pixels(x))[0]
