"""A PNG grid of images (reconstructions, samples from a prior, generated images per caption).

Without titles the grid is torchvision's `save_image`: every pixel as computed, 2 px padding.
With titles (one short caption per image) matplotlib draws each image at nearest-neighbour
scale under its title, since 32 px images would otherwise carry unreadable text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

PAD = 2  # pixels between images


def check_images(images: torch.Tensor) -> None:
    """(N, 1 | 3, H, W) floats in [0, 1], N >= 1; ValueError naming what is wrong."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"an image grid takes (N, 1 or 3, H, W) images with N >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"an image grid takes floats in [0, 1], got {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if not (0.0 <= low and high <= 1.0):  # NaN fails too
        raise ValueError(f"an image grid takes values in [0, 1], got [{low}, {high}]")


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8,
                    titles: Sequence[str] | None = None) -> Path:
    """Write `images` row by row, `nrow` per row, to the PNG `path` (parents created); titles,
    when given, one per image. Returns the path."""
    check_images(images)
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"an image grid got {len(titles)} titles for {len(images)} images")
    if nrow < 1:
        raise ValueError(f"an image grid needs nrow >= 1, got {nrow}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu()
    if titles is None:
        from torchvision.utils import save_image

        save_image(images, path, nrow=nrow, padding=PAD)
    else:
        _titled_grid(images, path, nrow, titles)
    return path


def _titled_grid(images: torch.Tensor, path: Path, nrow: int, titles: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / nrow)
    fig, axes = plt.subplots(rows, nrow, figsize=(1.6 * nrow, 1.9 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            picture = images[k].permute(1, 2, 0).numpy()
            ax.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(titles[k], fontsize=6, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
