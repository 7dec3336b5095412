"""Augmented views (SimCLR/BYOL/DINO style) and the evaluation transform, torchvision v2.

The caller decodes an image once; every crop of every view is drawn from that one PIL image.
Crop, flip, colour jitter and grayscale run on PIL (measured faster than their tensor
kernels); blur and solarize run on the small uint8 crop. Ops whose probability is 0 are left
out, so a view never pays for (or draws random numbers for) an op it cannot apply.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel_size(size: int) -> int:
    """About 10% of the crop side, odd, at least 3 (23 at 224 px, as in SimCLR)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def _view_pipeline(view: Any) -> v2.Compose:
    ops: list[Callable] = [
        v2.RandomResizedCrop(view.size, scale=tuple(view.scale),
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
    ]
    if view.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(view.flip_p))
    if view.jitter_p > 0:
        jitter = v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
        ops.append(v2.RandomApply([jitter], p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(view.grayscale_p))
    ops.append(v2.PILToTensor())
    if view.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(view.size), sigma=(0.1, 2.0))
        ops.append(v2.RandomApply([blur], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_p))  # uint8 here
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


class MultiViewTransform:
    """One normalised float tensor per crop, views expanded by their `count`, in order.

    A class rather than a closure so it pickles into spawned DataLoader workers.
    """

    def __init__(self, views: Sequence[Any]) -> None:
        if not views:
            raise ValueError("at least one view is required")
        if any(v.size is None for v in views):  # load_config sizes those of data.views
            raise ValueError("every view needs a size; a method's own views take data.image_size")
        self.pipelines = [_view_pipeline(v) for v in views for _ in range(v.count)]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline in self.pipelines]


def build_view_transform(views: Sequence[Any]) -> Callable[[Image.Image], list[torch.Tensor]]:
    """The multi-crop transform for `views` (ViewConfig-like objects)."""
    return MultiViewTransform(views)


def build_eval_transform(image_size: int) -> v2.Compose:
    """Resize (to size/0.875 above 64 px, as for ImageNet) + centre crop + normalise."""
    resize = round(image_size / 0.875) if image_size > 64 else image_size
    return v2.Compose([
        v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
