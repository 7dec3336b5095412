"""The three loaders the loader benchmark races, each as its user would write it.

- sslforge: ShardLoader + `build_view_transform(views)` (uint8 crops), `model_input` on each view
  in the consuming process (where the trainer normalises; on a CPU-only machine it costs CPU).
- torchvision: ImageFolder + DataLoader (default fork start, shuffle, default collate) with the
  plain torchvision v2 pipeline for each view, applied per crop to the one decoded image.
- webdataset: WebDataset(shards).shuffle().decode("pil") mapped by the same multi-crop
  transform, batched, through WebLoader.

All three take the same `ViewConfig`s (the methods' own) and deliver one tensor per crop stacked
over the batch, so a consumer sees the same shapes from each.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode, v2

from sslforge.data_pipeline.stream import ShardLoader
from sslforge.data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD, build_view_transform, model_input

BATCH = 32
SHUFFLE_BUFFER = 1000

# A loader: given an epoch, the batches' crops as the model takes them (list of (B, 3, S, S)).
Loader = Callable[[int], Iterator[list[torch.Tensor]]]


def torchvision_view(view: Any) -> v2.Compose:
    """The torchvision v2 pipeline a user writes for one view: every op on PIL, then float
    conversion and normalisation in the worker. Ops with probability 0 left out, as sslforge
    does; blur kernel 10% of the side (odd), sigma 0.1-2, as in SimCLR and sslforge."""
    ops: list[Callable] = [
        v2.RandomResizedCrop(view.size, scale=tuple(view.scale), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(view.flip_p),
    ]
    if view.jitter_p > 0:
        jitter = v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
        ops.append(v2.RandomApply([jitter], p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(view.grayscale_p))
    if view.blur_p > 0:
        kernel = max(3, int(0.1 * view.size) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_p))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


class MultiCrop:
    """DINO's DataAugmentation shape: every view's pipeline `count` times on one decoded image."""

    def __init__(self, views: Sequence[Any]) -> None:
        self.pipelines = [(torchvision_view(v), v.count) for v in views]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline, count in self.pipelines for _ in range(count)]


def sslforge_loader(shards: list[str], views: Sequence[Any], workers: int) -> Loader:
    loader = ShardLoader(shards, BATCH, build_view_transform(views), num_workers=workers,
                         shuffle_buffer=SHUFFLE_BUFFER)

    def epoch(e: int) -> Iterator[list[torch.Tensor]]:
        loader.set_epoch(e)
        for batch in loader:
            yield [model_input(v) for v in batch["views"]]

    return epoch


def imagefolder_loader(folder: str, views: Sequence[Any], workers: int) -> Loader:
    dataset = ImageFolder(folder, transform=MultiCrop(views))

    def epoch(e: int) -> Iterator[list[torch.Tensor]]:
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(e))
        for crops, _ in loader:
            yield crops

    return epoch


def webdataset_loader(shards: list[str], views: Sequence[Any], workers: int) -> Loader:
    dataset = (wds.WebDataset(shards, shardshuffle=len(shards), seed=0)
               .shuffle(SHUFFLE_BUFFER).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(MultiCrop(views), int).batched(BATCH, collation_fn=default_collate))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers)

    def epoch(e: int) -> Iterator[list[torch.Tensor]]:
        for crops, _ in loader:
            yield crops

    return epoch
