"""ImageNet-C style corruptions (Hendrycks & Dietterich, ICLR 2019), computed on the fly.

Every severity table (`c = [...][severity - 1]`) is the one of hendrycks/robustness
`ImageNet-C/create_c/make_imagenet_c.py` (commit e0377d4), which corrupts the 224 px centre
crop of each val image (Resize 256, CenterCrop 224), as `corrupt` does to the evaluation
transform's crop before normalisation. What differs from that script, and why:
- Images are a batch (B, 3, H, W) on any device, float in [0, 1] or uint8 (returned as given).
- Lengths in pixels (blur sigmas and radii, motion length) are scaled by side/224, so a crop of
  another size gets the same damage relative to its size; at 224 px they are the published values.
- ImageNet-C stored every corrupted image as a JPEG of quality 85 and scored those files; here
  the corrupted tensor is scored directly (no extra JPEG pass).
- Motion blur is ImageMagick's MotionBlurImage as the `imagecorruptions` package re-implements it
  (`_motion_blur`: a one-sided Gaussian line kernel of width 2r+1, edge pixels repeated) instead
  of calling Wand; snow's streaks use it too. Snow is therefore an approximation of the Wand one.
- Left out: glass blur (a sequential pixel-swapping loop), frost (needs the frost photographs),
  elastic transform and spatter. `BENCHMARK` holds the 12 of the 15 benchmark corruptions kept,
  `HELD_OUT` three of ImageNet-C's four held-out ones.

Randomness: sample i's draws come from generators seeded by (seed, corruption, severity, its
stable sample index) (`sample_seeds`), so the corrupted set is the same on every run whatever the
rank count or batch size. Bulk noise is drawn on the images' device (CPU and CUDA generators give
different, equally distributed, streams: compare numbers within one device type); scalars (angles,
fog's fractal) come from numpy and are the same everywhere.
"""
from __future__ import annotations

import io
import math
import zlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sslforge.eval import EvalError

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 224  # the crop ImageNet-C's pixel lengths are given for

Corruption = Callable[[torch.Tensor, int, list[int]], torch.Tensor]


# ------------------------------------------------------------------ helpers
def _torch_gens(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _per_sample(x: torch.Tensor, seeds: list[int], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """One draw per sample, each from its own generator."""
    return torch.stack([draw(g) for g in _torch_gens(seeds, x.device)])


def _scale(x: torch.Tensor) -> float:
    return x.shape[-1] / REFERENCE_SIDE


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source indices of a signal of length n padded by `before`/`after` samples, any amount:
    nearest (edge repeated), reflect (scipy's: edge repeated in the mirror, period 2n) or
    reflect101 (OpenCV's default: mirror about the edge sample, period 2n-2)."""
    idx = torch.arange(-before, n + after, device=device)
    if mode == "nearest" or n == 1:
        return idx.clamp(0, n - 1)
    period = 2 * n if mode == "reflect" else 2 * n - 2
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - 1 - idx if mode == "reflect" else period - idx, idx)


def _filter_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """Correlate every channel of x along `dim` (-1 or -2) with an odd 1-D kernel."""
    r = len(kernel) // 2
    x = x.index_select(dim, _pad_index(x.shape[dim], r, r, mode, x.device))
    b, c, h, w = x.shape
    weight = kernel.to(x)[None, None, None, :] if dim == -1 else kernel.to(x)[None, None, :, None]
    out = F.conv2d(x.reshape(b * c, 1, h, w), weight)
    return out.reshape(b, c, *out.shape[-2:])


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian per channel (scipy's gaussian_filter: radius int(truncate*sigma+0.5))."""
    kernel = _gaussian_kernel(sigma, int(truncate * sigma + 0.5))
    return _filter_axis(_filter_axis(x, kernel, -1, mode), kernel, -2, mode)


def _clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by `factor` keeping the side: crop ceil(h/factor), linear resize
    (scipy.ndimage.zoom order 1: corners aligned) to round(crop*factor), centre-trim to h."""
    h = x.shape[-1]
    crop = math.ceil(h / factor)
    top = (h - crop) // 2
    zoomed_side = round(crop * factor)
    zoomed = F.interpolate(x[..., top:top + crop, top:top + crop], size=(zoomed_side, zoomed_side),
                           mode="bilinear", align_corners=True)
    trim = (zoomed_side - h) // 2
    return zoomed[..., trim:trim + h, trim:trim + h]


def _motion_blur_one(image: torch.Tensor, radius: int, sigma: float, angle: float) -> torch.Tensor:
    """ImageMagick's motion blur of one (C, H, W) image: a trail of 2r+1 copies shifted along
    `angle` (degrees), weighted by a one-sided Gaussian, edge pixels repeated."""
    width = 2 * radius + 1
    weights = _gaussian_kernel(sigma, width - 1)[width - 1:]
    weights = weights / weights.sum()
    point_y, point_x = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    length = math.hypot(point_y, point_x)
    _, h, w = image.shape
    padded = F.pad(image[None], (width,) * 4, mode="replicate")[0]
    out = torch.zeros_like(image)
    for i, weight in enumerate(weights.tolist()):
        dy = -math.ceil(i * point_y / length - 0.5)
        dx = -math.ceil(i * point_x / length - 0.5)
        if abs(dy) >= h or abs(dx) >= w:  # the trail left the image
            break
        out += weight * padded[:, width - dy:width - dy + h, width - dx:width - dx + w]
    return out


def _hsv_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V, S and the hue's per-channel shape g (x = V (1 - S g)) of RGB images, with skimage's
    conventions: S = 0 where V = 0, hue 0 (g = (0, 1, 1)) where the pixel is grey."""
    value, low = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    delta = value - low
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    grey_hue = torch.tensor([0.0, 1.0, 1.0], device=x.device, dtype=x.dtype)[None, :, None, None]
    shape = torch.where(delta > 0, (value - x) / delta.clamp_min(1e-12), grey_hue)
    return value, saturation, shape


def _through_pil(x: torch.Tensor, op: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Apply a PIL operation to each image of the batch (as 8-bit RGB, as ImageNet-C does)."""
    out = []
    for image in (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
        out.append(torch.from_numpy(np.asarray(op(Image.fromarray(image)).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


# ------------------------------------------------------------------ noise
def gaussian_noise(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    c = [.08, .12, .18, .26, .38][severity - 1]
    noise = _per_sample(x, seeds, lambda g: torch.randn(x.shape[1:], generator=g, device=x.device))
    return (x + c * noise).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    c = [60, 25, 12, 5, 3][severity - 1]
    gens = _torch_gens(seeds, x.device)
    return (torch.stack([torch.poisson(xi * c, generator=g) for xi, g in zip(x, gens)]) / c).clamp(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    """Salt and pepper per channel value (skimage's 's&p'): a fraction c replaced, half by 1."""
    c = [.03, .06, .09, .17, .27][severity - 1]
    draws = _per_sample(x, seeds, lambda g: torch.rand((2, *x.shape[1:]), generator=g, device=x.device))
    flipped, salt = draws[:, 0] < c, draws[:, 1] < 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def speckle_noise(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    c = [.15, .2, .35, .45, .6][severity - 1]
    noise = _per_sample(x, seeds, lambda g: torch.randn(x.shape[1:], generator=g, device=x.device))
    return (x + x * c * noise).clamp(0, 1)


# ------------------------------------------------------------------ blur
def gaussian_blur(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    c = [1, 2, 3, 4, 6][severity - 1]
    return _gaussian_filter(x, c * _scale(x)).clamp(0, 1)


def _disk(radius: float, alias_blur: float, small: bool, scale: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a normalised disk on a grid of half-width 8 (or the radius,
    above 8), smoothed by a 3x3 (5x5 above 8) Gaussian of sigma `alias_blur`, mirrored edges."""
    half = max(1, math.ceil((8 if small else radius) * scale))
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((taps[:, None] ** 2 + taps[None, :] ** 2) <= (radius * scale) ** 2).double()
    disk = disk / disk.sum()
    smooth = _gaussian_kernel(alias_blur, 1 if small else 2).double()
    disk = _filter_axis(_filter_axis(disk[None, None], smooth, -1, "reflect101"), smooth, -2, "reflect101")
    return disk[0, 0].float()


def defocus_blur(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    radius, alias_blur = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    kernel = _disk(radius, alias_blur, radius <= 8, _scale(x)).to(x)
    r = kernel.shape[0] // 2
    n = x.shape[-1]
    idx = _pad_index(n, r, r, "reflect101", x.device)  # cv2.filter2D's default border
    padded = x.index_select(-1, idx).index_select(-2, idx)
    b, c = x.shape[:2]
    out = F.conv2d(padded.reshape(b * c, 1, n + 2 * r, n + 2 * r), kernel[None, None])
    return out.reshape(x.shape).clamp(0, 1)


def motion_blur(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    scale = _scale(x)
    angles = [np.random.default_rng(s).uniform(-45, 45) for s in seeds]
    return torch.stack([_motion_blur_one(xi, max(1, round(radius * scale)), sigma * scale, a)
                        for xi, a in zip(x, angles)]).clamp(0, 1)


def zoom_blur(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    factors = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
               np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][severity - 1]
    out = sum(_clipped_zoom(x, float(f)) for f in factors)
    return ((x + out) / (len(factors) + 1)).clamp(0, 1)


# ------------------------------------------------------------------ weather
def _plasma_fractal(rng: np.random.Generator, size: int = 256, decay: float = 3.0) -> np.ndarray:
    """Diamond-square height map in [0, 1] (ImageNet-C's `plasma_fractal`): each midpoint is the
    mean of its neighbours plus uniform noise whose amplitude shrinks by `decay` per level."""
    heights = np.zeros((size, size))
    step, wibble = size, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = heights[0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=0)
        heights[half::step, half::step] = noisy_mean(square + np.roll(square, -1, axis=1))
        centres, corners = heights[half::step, half::step], heights[0::step, 0::step]
        heights[0::step, half::step] = noisy_mean(centres + np.roll(centres, 1, axis=0)
                                                  + corners + np.roll(corners, -1, axis=1))
        heights[half::step, 0::step] = noisy_mean(centres + np.roll(centres, 1, axis=1)
                                                  + corners + np.roll(corners, -1, axis=0))
        step, wibble = half, wibble / decay
    heights -= heights.min()
    return heights / heights.max()


def fog(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    """The fractal's 224 px crop, resized to the image's side (the same look at any size)."""
    strength, decay = [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)][severity - 1]
    maps = np.stack([_plasma_fractal(np.random.default_rng(s), decay=decay)[:REFERENCE_SIDE, :REFERENCE_SIDE]
                     for s in seeds])
    haze = torch.from_numpy(maps).to(x)[:, None]
    if haze.shape[-1] != x.shape[-1]:
        haze = F.interpolate(haze, size=x.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    peak = x.amax((1, 2, 3), keepdim=True)
    return ((x + strength * haze) * peak / (peak + strength)).clamp(0, 1)


def snow(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    """Zoomed, thresholded Gaussian flakes streaked by motion blur, added twice (the second
    copy rotated 180 degrees) over an image whitened towards 1.5 x its grey level + 0.5."""
    loc, spread, zoom, threshold, radius, sigma, keep = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][severity - 1]
    scale = _scale(x)
    flakes = loc + spread * _per_sample(x, seeds, lambda g: torch.randn((1, *x.shape[2:]), generator=g,
                                                                         device=x.device))
    flakes = _clipped_zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
    flakes = (flakes.clamp(0, 1) * 255).floor() / 255  # ImageNet-C passes the layer through 8 bits
    angles = [np.random.default_rng(s).uniform(-135, -45) for s in seeds]
    flakes = torch.stack([_motion_blur_one(f, max(1, round(radius * scale)), sigma * scale, a)
                          for f, a in zip(flakes, angles)])
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    x = keep * x + (1 - keep) * torch.maximum(x, grey * 1.5 + 0.5)
    return (x + flakes + flakes.flip(-1, -2)).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    """HSV value + c, clipped: with hue and saturation kept, RGB scales by V'/V (black turns grey)."""
    c = [.1, .2, .3, .4, .5][severity - 1]
    value = x.amax(1, keepdim=True)
    lifted = (value + c).clamp(max=1)
    return torch.where(value > 0, x * lifted / value.clamp_min(1e-12), lifted.expand_as(x)).clamp(0, 1)


# ------------------------------------------------------------------ digital
def contrast(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    c = [0.4, .3, .2, .1, .05][severity - 1]
    means = x.mean((2, 3), keepdim=True)
    return ((x - means) * c + means).clamp(0, 1)


def saturate(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    """HSV saturation S * a + b, clipped, hue and value kept."""
    a, b = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][severity - 1]
    value, saturation, shape = _hsv_parts(x)
    return (value * (1 - (saturation * a + b).clamp(0, 1) * shape)).clamp(0, 1)


def jpeg_compression(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    quality = [25, 18, 15, 10, 7][severity - 1]

    def compress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)

    return _through_pil(x, compress)


def pixelate(x: torch.Tensor, severity: int, seeds: list[int]) -> torch.Tensor:
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    side = x.shape[-1]
    small = max(1, int(side * c))
    return _through_pil(x, lambda im: im.resize((small, small), Image.BOX).resize((side, side), Image.BOX))


CORRUPTIONS: dict[str, Corruption] = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, speckle_noise, gaussian_blur, defocus_blur, motion_blur,
    zoom_blur, snow, fog, brightness, contrast, saturate, jpeg_compression, pixelate)}
BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
             "snow", "fog", "brightness", "contrast", "pixelate", "jpeg_compression")
HELD_OUT = ("speckle_noise", "gaussian_blur", "saturate")


def check_corruptions(names: list[str] | tuple[str, ...], severities: list[int] | tuple[int, ...]) -> None:
    """ValueError naming an unknown corruption or a severity outside 1..5."""
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise EvalError(f"unknown corruption(s) {unknown}; available: {', '.join(CORRUPTIONS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise EvalError(f"corruption severities must be in 1..5, got {bad}")


def sample_seeds(seed: int, name: str, severity: int, index: torch.Tensor) -> list[int]:
    """One seed per sample from (seed, corruption, severity, stable sample index)."""
    key = zlib.crc32(name.encode())
    return [int(np.random.SeedSequence([seed, key, severity, int(i)]).generate_state(1, np.uint64)[0] >> 1)
            for i in index.tolist()]


def corrupt(images: torch.Tensor, name: str, severity: int, seeds: list[int]) -> torch.Tensor:
    """`images` (B, 3, H, W), float in [0, 1] or uint8, corrupted at `severity` (0: unchanged),
    in the same dtype; `seeds` one per image (`sample_seeds`)."""
    check_corruptions([name], [severity] if severity else [])
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"corruptions take square RGB batches (B, 3, S, S), got {tuple(images.shape)}")
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    if severity == 0:
        return images
    as_uint8 = images.dtype == torch.uint8
    x = images.float() / 255 if as_uint8 else images
    out = CORRUPTIONS[name](x, severity, seeds)
    return (out * 255).round().to(torch.uint8) if as_uint8 else out.to(images.dtype)


__all__ = ["BENCHMARK", "CORRUPTIONS", "HELD_OUT", "SEVERITIES", "check_corruptions", "corrupt", "sample_seeds"]
