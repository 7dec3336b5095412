"""Mixup and CutMix of a batch, drawn once and applied alike to images, labels and token labels.

timm's batch mode, the DeiT/FAN/STL recipe: with probability `prob` the batch is mixed, by
CutMix with probability `switch_prob` (when both alphas are set), else by Mixup; lambda ~
Beta(alpha, alpha). Sample i is mixed with sample b-1-i of the rank's batch (timm's flip), so
mixing pairs samples within a rank, as every official implementation does.

CutMix's box is drawn on the reference crop size (timm's `rand_bbox`: side sqrt(1 - lambda)
of the image's, centre uniform, clipped at the border) and lambda is corrected to the kept
area. The same box cuts every tensor the batch carries: another crop of the same geometry
(STL's clean view) at its own size, and per-token label maps, where each token's label is
mixed by the fraction of its cell the box covers; so the token labels' mean over the grid
mixes by exactly the images' lambda.

A `Mix` is drawn from a generator the caller seeds per (seed, step, rank): a resumed run draws
the same mixes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: `lam` is each sample's own share; `box` (top, bottom, left, right)
    in pixels of a `size` x `size` crop, or None for Mixup (or no mixing, lam 1)."""

    lam: float
    box: tuple[int, int, int, int] | None
    size: int

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """The mixed batch (B, C, H, W), H = W any size: the box scales to it."""
        if self.box is None:
            return x if self.lam == 1.0 else x * self.lam + x.flip(0) * (1.0 - self.lam)
        top, bottom, left, right = (round(v * x.shape[-1] / self.size) for v in self.box)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
        return mixed

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Per-sample label distributions (B, K) mixed by lambda."""
        return y if self.lam == 1.0 else y * self.lam + y.flip(0) * (1.0 - self.lam)

    def token_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Per-token label distributions (B, gh, gw, K): by lambda for Mixup; for CutMix each
        token takes its partner's label in the share of its cell that the box covers."""
        if self.box is None:
            return self.targets(y)
        gh, gw = y.shape[1:3]
        covered = self.box_coverage(gh, gw).to(y.device, y.dtype)[None, :, :, None]
        return y * (1.0 - covered) + y.flip(0) * covered

    def box_coverage(self, gh: int, gw: int) -> torch.Tensor:
        """(gh, gw): the share of each cell of a gh x gw grid over the crop inside the box."""
        top, bottom, left, right = self.box or (0, 0, 0, 0)
        rows = _overlap(top, bottom, self.size, gh)
        cols = _overlap(left, right, self.size, gw)
        return rows[:, None] * cols[None, :]


def _overlap(lo: int, hi: int, size: int, cells: int) -> torch.Tensor:
    """The share of each of `cells` equal intervals of [0, size) inside [lo, hi)."""
    edges = torch.linspace(0, size, cells + 1, dtype=torch.float64)
    inside = (torch.minimum(edges[1:], torch.tensor(float(hi))) - torch.maximum(edges[:-1], torch.tensor(float(lo))))
    return (inside.clamp(min=0) / (edges[1:] - edges[:-1])).float()


def draw_mix(cfg: MixConfig, size: int, rng: np.random.Generator) -> Mix:
    """This batch's mixing on crops of `size` pixels."""
    mixup, cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (mixup or cutmix) or rng.random() >= cfg.prob:
        return Mix(1.0, None, size)
    use_cutmix = cutmix and (not mixup or rng.random() < cfg.switch_prob)
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix
                else rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    if not use_cutmix:
        return Mix(lam, None, size)
    cut = int(size * np.sqrt(1.0 - lam))
    cy, cx = (int(c) for c in rng.integers(0, size, 2))
    top, bottom = int(np.clip(cy - cut // 2, 0, size)), int(np.clip(cy + cut // 2, 0, size))
    left, right = int(np.clip(cx - cut // 2, 0, size)), int(np.clip(cx + cut // 2, 0, size))
    kept = 1.0 - (bottom - top) * (right - left) / float(size * size)
    return Mix(kept, (top, bottom, left, right), size)


def mix_generator(seed: int, step: int, rank: int) -> np.random.Generator:
    """The mixing draws of one rank's step: the same on a resumed run."""
    return np.random.default_rng([seed, step, rank, 0x6D6978])


__all__ = ["Mix", "MixConfig", "draw_mix", "mix_generator"]
