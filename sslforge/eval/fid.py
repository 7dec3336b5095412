"""Fréchet Inception Distance through torchmetrics (Heusel et al., 2017), from a local file.

torchmetrics' `FrechetInceptionDistance(feature=2048)` runs torch-fidelity's port of the
TensorFlow Inception-v3 graph that the published FIDs use (pool3 features) and keeps running
sums of the features and of their outer products. Images are resized to 299 by TF1's bilinear
rule, as torch-fidelity and the TensorFlow FID code do (`antialias=False`: torchmetrics'
default resizes with torch's antialiased bilinear, which moves the score away from the
published ones). The weights are torch-fidelity's own state dict, read from
`eval.inception_weights`: nothing is downloaded at run time, and the file is read as data only
(`weights_only_loads`).

Distributed: each rank updates with its share of the real and generated images; `compute`
sums the statistics over ranks (through `sslforge.distributed`, not torchmetrics' own sync),
so the score is that of the union, whatever the world size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sslforge import distributed

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
CONFIG_KEY = "eval.inception_weights"
FEATURES = 2048  # pool3: the features every published FID uses


def check_inception_weights(path: str | Path) -> None:
    """Raise ValueError naming the file, its URL and the config key when `path` is not a file;
    loads nothing (a configuration check before training)."""
    if not Path(path).expanduser().is_file():
        raise ValueError(f"{CONFIG_KEY}: {path} does not exist; FID needs torch-fidelity's Inception-v3 "
                         f"weights {INCEPTION_FILE}: download {INCEPTION_URL} and set {CONFIG_KEY} to "
                         "the file's path")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 as given, or floats in [0, 1] rounded to the nearest of 256 levels
    (what saving the image as a PNG would keep)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"FID takes uint8 images or floats in [0, 1], got {images.dtype}")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


class FrechetDistance:
    """Running FID statistics of real and generated images on this rank; `compute` is
    collective and returns the FID of every rank's images together."""

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu", features: int = FEATURES) -> None:
        """`features`: Inception's pool3 (2048, every published FID) or an earlier pooling
        (64, 192, 768: torchmetrics' other choices, cheap to test with: the Fréchet distance of
        2048-d Gaussians takes an eigendecomposition of a 2048 x 2048 matrix)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        from sslforge.trainer.safe_load import weights_only_loads

        check_inception_weights(weights)
        with weights_only_loads():  # torch-fidelity calls torch.load(weights_only=False)
            self.metric = FrechetInceptionDistance(feature=features, normalize=False, sync_on_compute=False,
                                                   antialias=False,
                                                   feature_extractor_weights_path=str(Path(weights).expanduser()))
        self.metric = self.metric.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add (B, 3, H, W) images (uint8, or floats in [0, 1]) of either set; any size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID takes (B, 3, H, W) images, got {tuple(images.shape)}")
        if len(images):
            self.metric.update(to_uint8(images.to(self.device)), real=real)

    def counts(self) -> tuple[int, int]:
        """(real, generated) images added on this rank."""
        return int(self.metric.real_features_num_samples), int(self.metric.fake_features_num_samples)

    @torch.no_grad()
    def compute(self) -> float:
        """FID of all ranks' images (collective); the statistics are then reset."""
        for name in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
                     "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples"):
            local = getattr(self.metric, name)
            total = distributed.all_reduce_sum(local.to(distributed.comm_device()))
            setattr(self.metric, name, total.to(local.device))
        real, fake = self.counts()
        if real < 2 or fake < 2:
            raise ValueError(f"FID needs at least 2 real and 2 generated images, got {real} and {fake}")
        score = float(self.metric.compute())
        self.metric.reset()
        return score


__all__ = [
    "CONFIG_KEY",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "FrechetDistance",
    "check_inception_weights",
    "to_uint8",
]
