"""Augmented views (SimCLR/BYOL/DINO style) and the evaluation transform, torchvision v2.

The caller decodes an image once, no larger than its crops need (`decode_size`: JPEGs decode
at a reduced DCT scale when even the smallest crop keeps its full resolution); every crop of
every view is drawn from that one PIL image. Crop, flip, colour jitter, grayscale and
RandAugment run on PIL (measured faster than their tensor kernels); blur (separable, the same
kernel as torchvision's) and solarize run on the small uint8 crop. Crops leave the worker as
uint8, a quarter of float32's bytes; `model_input` turns them into normalised float on the
accelerator. A view with random erasing (its noise lives in normalised units) is finished in
the worker and travels as float32. A view may share another's crop boxes and flips
(`ViewConfig.geometry_of`). Ops whose probability is 0 are left out, so a view never pays for
(or draws random numbers for) an op it cannot apply.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import math

import torch
import torch.nn.functional as F
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


# A reduced decode keeps at least this many pixels per output pixel for the resize after it.
# Pillow's reducing_gap (thumbnail's default, 2.0): with a gap of 2 the two-step result is close to
# a fair resize; at 1 the DCT scaling and the resize both soften the top octave (measured: ~7%
# less fine detail at 224 px from a 1/4 decode).
DECODE_MARGIN = 2.0


def model_input(crops: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) crops as the network takes them: uint8 ones become float, scaled to [0, 1]
    and normalised on their device (after the copy there: a quarter of the bytes); float ones,
    finished in the worker, pass as they are."""
    if crops.is_floating_point():
        return crops
    mean = torch.tensor(IMAGENET_MEAN, device=crops.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=crops.device).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, crops.to(torch.float32), 1 / (255 * std))  # (x/255 - mean)/std, one pass


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
    """The crop `geometry` names, resized to `size` x `size` (bicubic, antialiased), as
    torchvision's resized_crop; a box at least 2 x `DECODE_MARGIN` times larger is first reduced
    by an integer factor (Pillow's reducing_gap), keeping `DECODE_MARGIN` x the size for the
    bicubic pass (measured on 1600 px photos: 1.7x faster, 98% of the fine detail, PSNR > 50 dB)."""
    top, left, height, width = geometry.box
    crop = image.crop((left, top, left + width, top + height)).resize(
        (size, size), Image.Resampling.BICUBIC, reducing_gap=DECODE_MARGIN)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if geometry.flip else crop


class SeparableGaussianBlur:
    """torchvision's GaussianBlur on a uint8 (C, H, W) crop, as two 1-D passes: the same sigma
    draw (uniform in `sigma`), kernel and reflect padding, so the same pixels up to float
    rounding, at 2k instead of k^2 multiplications per pixel (23 px kernel at 224: ~10x less)."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.kernel_size, self.sigma = kernel_size, sigma

    def __call__(self, crop: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        k = self.kernel_size
        lim = (k - 1) / (2.0 * math.sqrt(2.0))
        kernel = torch.softmax(torch.linspace(-lim, lim, k).div(sigma).pow(2).neg(), dim=0)
        channels = crop.shape[-3]
        x = F.pad(crop.to(torch.float32).unsqueeze(0), [k // 2] * 4, mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(channels, 1, 1, k), groups=channels)
        x = F.conv2d(x, kernel.view(1, 1, k, 1).expand(channels, 1, k, 1), groups=channels)
        return x.squeeze(0).round_().to(crop.dtype)


def _photometric(view: Any) -> v2.Compose:
    """Everything after the crop that keeps uint8: colour ops on PIL, RandAugment, then
    blur/solarize on the uint8 tensor."""
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
        ops.append(v2.RandomApply([SeparableGaussianBlur(blur_kernel_size(view.size))], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_p))  # uint8 here
    return v2.Compose(ops)


def _finish_in_worker(view: Any) -> v2.Compose:
    """`model_input`'s normalisation done in the worker, then random erasing on the normalised
    crop (as DeiT's and timm's pipelines): float32 out."""
    ops: list[Callable] = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
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
    """One tensor per crop, views expanded by their `count`, in order: uint8 (finished by
    `model_input` on the accelerator), or float32 for a view with random erasing and for every
    view when `dtype` is float32 (the whole pipeline in the worker, as before uint8 transport).

    Each crop's geometry is drawn (or, for a view with `geometry_of`, taken from the crop of the
    same number in that view), then cut at the view's size, then the view's photometric ops run.
    A class rather than a closure so it pickles into the DataLoader workers.
    """

    def __init__(self, views: Sequence[Any], dtype: torch.dtype = torch.uint8) -> None:
        if not views:
            raise ValueError("at least one view is required")
        if any(v.size is None for v in views):  # load_config sizes those of data.views
            raise ValueError("every view needs a size; a method's own views take data.image_size")
        if dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"crops travel as uint8 or float32, not {dtype}")
        check_views(views)
        self.views = list(views)
        self.photometric = [_photometric(v) for v in views]
        self.finish = [_finish_in_worker(v) if dtype == torch.float32 or v.erase_p > 0 else None for v in views]
        # the smallest fraction of the image's area any crop of a view may cover
        self.min_scale = [views[v.geometry_of].scale[0] if v.geometry_of is not None else v.scale[0] for v in views]

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) to decode a width x height image at with every crop still
        at full resolution: a crop covers at least `min_scale` of the area at an aspect ratio
        within [3/4, 4/3], so its shorter side is at least sqrt(min_scale * area * 3/4), and that
        must stay >= `DECODE_MARGIN` x the view's size."""
        shrink = min(math.sqrt(s * width * height * 3 / 4) / (DECODE_MARGIN * v.size)
                     for v, s in zip(self.views, self.min_scale))
        if shrink <= 1:
            return width, height
        return math.ceil(width / shrink), math.ceil(height / shrink)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        geometries: list[list[CropGeometry]] = []
        crops = []
        for view, photometric, finish in zip(self.views, self.photometric, self.finish):
            shared = None if view.geometry_of is None else geometries[view.geometry_of]
            geometries.append([])
            for i in range(view.count):  # each crop's draws in turn: geometry, then photometric
                geometry = draw_geometry(image, view) if shared is None else shared[i]
                geometries[-1].append(geometry)
                crop = photometric(cut(image, geometry, view.size))
                crops.append(crop if finish is None else finish(crop))
        return crops


def build_view_transform(views: Sequence[Any], dtype: torch.dtype = torch.uint8) -> MultiViewTransform:
    """The multi-crop transform for `views` (ViewConfig-like objects)."""
    return MultiViewTransform(views, dtype)


class EvalTransform(v2.Compose):
    """The evaluation transform, and the size it needs an image decoded at."""

    def __init__(self, transforms: Sequence[Callable], resize: int) -> None:
        super().__init__(list(transforms))
        self.resize = resize

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """Shorter side at least `DECODE_MARGIN` x the resize target."""
        shrink = min(width, height) / (DECODE_MARGIN * self.resize)
        if shrink <= 1:
            return width, height
        return math.ceil(width / shrink), math.ceil(height / shrink)


def build_eval_transform(image_size: int) -> EvalTransform:
    """Resize (to size/0.875 above 64 px, as for ImageNet) + centre crop + normalise."""
    resize = round(image_size / 0.875) if image_size > 64 else image_size
    return EvalTransform([
        v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ], resize)
