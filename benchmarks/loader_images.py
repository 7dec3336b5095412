"""ImageNet-size JPEGs for the loader benchmark, drawn here (no download), written once as an
ImageFolder tree and as the shards sslforge reads (`imagefolder_to_shards`: the same bytes).

A JPEG's decode time follows its size in pixels and its entropy (coded bits per pixel), so the
images mimic photographs on both: ImageNet's usual shapes (500x375, 500x333, 375x500, 500x500)
plus a share of large ones (1024-1600 px long side, as in ImageNet's tail and Open Images);
content with a natural image's roughly 1/f spectrum (a smooth colour field, soft-edged shapes,
texture at several scales, sensor noise), saved as a camera does: baseline, quality 90, 4:2:0.
"""
from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sslforge.data_pipeline.imagefolder import imagefolder_to_shards

SMALL_SHAPES = [(500, 375), (500, 333), (375, 500), (500, 500)]
LARGE_SIDES = (1024, 1600)  # long side of the large share, uniform in this range
ASPECTS = (4 / 3, 3 / 2)  # long side / short side of the large share
# texture: (cell size in px of a 500 px image, scaled with the long side; amplitude, grey levels)
OCTAVES = ((96, 20.0), (24, 12.0), (6, 10.0), (2, 10.0))
SENSOR_NOISE = 6.0  # per-pixel noise, grey levels, at any size


class Dataset(NamedTuple):
    """The written images: an ImageFolder root, its shards, and each file's bytes and size."""

    folder: str
    shards: list[str]
    encoded: list[bytes]
    sizes: list[tuple[int, int]]


def image_shapes(n: int, large_share: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(width, height) of n images: a `large_share` of them large, the rest ImageNet's shapes."""
    shapes = []
    for i in range(n):
        if i < round(n * large_share):
            long = int(rng.integers(LARGE_SIDES[0], LARGE_SIDES[1] + 1))
            short = round(long / rng.choice(ASPECTS))
            shapes.append((long, short) if rng.random() < 0.75 else (short, long))
        else:
            shapes.append(SMALL_SHAPES[int(rng.integers(len(SMALL_SHAPES)))])
    order = rng.permutation(n)  # large ones spread over the classes and shards
    return [shapes[i] for i in order]


def _upsampled(rng: np.random.Generator, width: int, height: int, cell: int, channels: int) -> np.ndarray:
    """Smooth random field: normal noise on a grid of `cell` px, bicubic to (height, width, channels)."""
    gw, gh = max(2, width // cell + 2), max(2, height // cell + 2)
    planes = [np.asarray(Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32), mode="F")
                         .resize((width, height), Image.BICUBIC)) for _ in range(channels)]
    return np.stack(planes, axis=-1)


def _shapes(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Ellipses, rectangles and polygons in random colours: the edges a photo's objects give."""
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for _ in range(int(rng.integers(15, 40))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = np.exp(rng.uniform(np.log(0.01), np.log(0.3))) * min(width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)


def draw_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photo-like RGB image: colour field + shapes (softened edges) + multi-scale texture."""
    field = rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)
    canvas = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    _shapes(rng, canvas)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    pixels = np.asarray(canvas, dtype=np.float32)
    zoom = max(width, height) / 500
    for cell, amplitude in OCTAVES:
        cell = max(1, round(cell * zoom))
        pixels += amplitude * _upsampled(rng, width, height, cell, 1)  # luminance texture
        pixels += 0.3 * amplitude * _upsampled(rng, width, height, cell * 2, 3)  # colour texture
    pixels += rng.normal(0, SENSOR_NOISE, pixels.shape).astype(np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image) -> bytes:
    """Baseline JPEG, quality 90, 4:2:0 chroma subsampling: what a camera writes."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, subsampling="4:2:0")
    return buffer.getvalue()


def write_dataset(root: str, n: int, classes: int = 10, large_share: float = 0.2, seed: int = 0,
                  shards: int = 8) -> Dataset:
    """n JPEGs (label = index mod `classes`) as `root/folder/class_XX/*.jpg`, then the same
    files as `shards` tar shards under `root/shards` (sslforge's ImageFolder converter)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "folder")
    encoded, sizes = [], []
    for i, (width, height) in enumerate(image_shapes(n, large_share, rng)):
        data = encode_jpeg(draw_image(rng, width, height))
        directory = os.path.join(folder, f"class_{i % classes:02d}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
        encoded.append(data)
        sizes.append((width, height))
    written = imagefolder_to_shards(folder, os.path.join(root, "shards"), max_per_shard=-(-n // shards))
    paths = written.splits[0].shards
    return Dataset(folder, paths, encoded, sizes)
