"""Augmented views (SimCLR/BYOL/DINO style) and the evaluation transform, torchvision v2.

The caller decodes an image once; every crop of every view is drawn from that one PIL image.
Crop, flip, colour jitter, grayscale and RandAugment run on PIL (measured faster than their
tensor kernels); blur and solarize run on the small uint8 crop, random erasing on the normalised
one. A view may share another's crop boxes and flips (`ViewConfig.geometry_of`). Ops whose probability is 0 are left
out, so a view never pays for (or draws random numbers for) an op it cannot apply.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) crops back to [0, 1] pixels (the views' Normalize
    undone, exact up to float rounding): what generative methods model."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def blur_kernel_size(size: int) -> int:
    """About 10% of the crop side, odd, at least 3 (23 at 224 px, as in SimCLR)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


class CropGeometry(NamedTuple):
    """Where a crop comes from: its box in the decoded image (top, left, height, width) and
    whether it is mirrored. A view with `geometry_of` reuses another view's geometries."""

    box: tuple[int, int, int, int]
    flip: bool


def draw_geometry(image: Image.Image, view: Any) -> CropGeometry:
    """A random-resized-crop box (torchvision's rule: area in `view.scale`, aspect 3/4-4/3) and
    a flip drawn with probability `view.flip_p` (no draw when it is 0)."""
    box = tuple(RandomResizedCrop.get_params(image, list(view.scale), [3 / 4, 4 / 3]))
    flip = view.flip_p > 0 and bool(torch.rand(1) < view.flip_p)
    return CropGeometry(box, flip)  # type: ignore[arg-type]


def cut(image: Image.Image, geometry: CropGeometry, size: int) -> Image.Image:
    """The crop `geometry` names, resized to `size` x `size` (bicubic, antialiased)."""
    crop = v2.functional.resized_crop(image, *geometry.box, [size, size],
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)
    return v2.functional.horizontal_flip(crop) if geometry.flip else crop


def _photometric(view: Any) -> v2.Compose:
    """Everything after the crop: colour ops on PIL, RandAugment, blur/solarize on uint8,
    normalisation, random erasing on the normalised tensor (as DeiT's and timm's pipelines)."""
    ops: list[Callable] = []
    if view.jitter_p > 0:
        jitter = v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
        ops.append(v2.RandomApply([jitter], p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(view.grayscale_p))
    if view.randaugment:
        ops.append(_randaugment(view.randaugment, view.size))
    ops.append(v2.PILToTensor())
    if view.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(view.size), sigma=(0.1, 2.0))
        ops.append(v2.RandomApply([blur], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_p))  # uint8 here
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if view.erase_p > 0:
        from timm.data.random_erasing import RandomErasing

        ops.append(RandomErasing(view.erase_p, mode="pixel", device="cpu"))
    return v2.Compose(ops)


def _randaugment(spec: str, size: int) -> Callable:
    """timm's RandAugment with the hyperparameters its ImageNet train transform passes:
    translations up to 45% of the crop side, the ImageNet mean as fill, bicubic."""
    from timm.data import rand_augment_transform

    fill = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)
    augment = rand_augment_transform(spec, {"translate_const": int(size * 0.45), "img_mean": fill,
                                            "interpolation": Image.BICUBIC})
    for op in augment.ops:
        if "Posterize" in op.name:
            op.aug_fn = _posterize
    return augment


def _posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize for every level it draws: at magnitude 10 "inc1" keeps 0 bits, which
    Pillow 13 refuses; older Pillow (timm's reference) made the image black, as this does."""
    if bits >= 8:
        return image
    return image.point(lambda _: 0) if bits <= 0 else ImageOps.posterize(image, bits)


def check_views(views: Sequence[Any]) -> None:
    """A `geometry_of` must name an earlier view with the same count; a RandAugment spec must
    parse. Raises ValueError naming the view."""
    for i, view in enumerate(views):
        source = view.geometry_of
        if source is not None and not (0 <= source < i and views[source].geometry_of is None):
            raise ValueError(f"view {i}: geometry_of={source} must name an earlier view that draws its own geometry")
        if source is not None and views[source].count != view.count:
            raise ValueError(f"view {i}: geometry_of={source} needs the same count as that view "
                             f"({view.count} vs {views[source].count})")
        if view.randaugment:
            try:
                _randaugment(view.randaugment, view.size or 224)
            except Exception as exc:  # timm raises AssertionError/KeyError/ValueError on a bad spec
                raise ValueError(f"view {i}: randaugment '{view.randaugment}' is not a timm RandAugment "
                                 f"spec such as rand-m9-mstd0.5-inc1 ({exc!r})") from None
        if not 0 <= view.erase_p <= 1:
            raise ValueError(f"view {i}: erase_p {view.erase_p} must be in [0, 1]")


class MultiViewTransform:
    """One normalised float tensor per crop, views expanded by their `count`, in order.

    Each crop's geometry is drawn (or, for a view with `geometry_of`, taken from the crop of the
    same number in that view), then cut at the view's size, then the view's photometric ops run.
    A class rather than a closure so it pickles into spawned DataLoader workers.
    """

    def __init__(self, views: Sequence[Any]) -> None:
        if not views:
            raise ValueError("at least one view is required")
        if any(v.size is None for v in views):  # load_config sizes those of data.views
            raise ValueError("every view needs a size; a method's own views take data.image_size")
        check_views(views)
        self.views = list(views)
        self.photometric = [_photometric(v) for v in views]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        geometries: list[list[CropGeometry]] = []
        crops = []
        for view, photometric in zip(self.views, self.photometric):
            shared = None if view.geometry_of is None else geometries[view.geometry_of]
            geometries.append([])
            for i in range(view.count):  # each crop's draws in turn: geometry, then photometric
                geometry = draw_geometry(image, view) if shared is None else shared[i]
                geometries[-1].append(geometry)
                crops.append(photometric(cut(image, geometry, view.size)))
        return crops


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
