"""A built-in, procedurally drawn dataset for demos and tests: which shape is drawn.

The label is the shape; everything else is a nuisance chosen to defeat raw-pixel nearest
neighbours (position, scale, rotation, foreground colour, background colour and texture), so
kNN accuracy on learned features, not on pixels, tells whether pretraining learned anything.
Each image is drawn from its own RNG keyed by (seed, split, index): deterministic and
independent of how many images are written.

With captions (`KEY.txt`, for text-to-image and image-text methods) each image is described
from the attributes `draw_shape` actually used: size (of the shape's scale), shade and colour
(the shape's hue; the background shares it), shape and position (of the drawn shape's centre
of mass), in one of a few phrasings, e.g. "a large dark red circle in the top left corner".
"""
from __future__ import annotations

import colorsys
import glob
import io
import json
import os
from typing import Callable, Iterator, NamedTuple

import numpy as np
from PIL import Image

from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.shards import CLASSES_FILE, SIZES_FILE, write_shards

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]
_SQRT3 = 3 ** 0.5


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.hypot(u, v), np.arctan2(v, u)


# Shapes in local coordinates: roughly the unit disc, centred, upright.
SHAPES: dict[str, Mask] = {
    "circle": lambda u, v: u * u + v * v < 1,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,
    "triangle": lambda u, v: (v > -0.5) & (_SQRT3 * abs(u) + v < 1),
    "cross": lambda u, v: ((abs(u) < 0.28) & (abs(v) < 1)) | ((abs(v) < 0.28) & (abs(u) < 1)),
    "star": lambda u, v: _polar(u, v)[0] < 0.55 + 0.45 * np.cos(5 * _polar(u, v)[1]),
    "ring": lambda u, v: (_polar(u, v)[0] > 0.6) & (_polar(u, v)[0] < 1),
    "bar_pair": lambda u, v: (abs(u) > 0.25) & (abs(u) < 0.65) & (abs(v) < 0.95),
    "arrow": lambda u, v: (((abs(v) < 0.2) & (u > -1) & (u < 0.15))
                          | ((u >= 0.1) & (u < 1) & (abs(v) < 0.8 * (1 - u)))),
    "crescent": lambda u, v: (u * u + v * v < 1) & ((u - 0.45) ** 2 + v * v > 0.56),
    "ell": lambda u, v: (((u > -0.8) & (u < -0.3) & (abs(v) < 0.9))
                        | ((v > 0.4) & (v < 0.9) & (u > -0.8) & (u < 0.7))),
}
CLASSES = list(SHAPES)
_SUPERSAMPLE = 2  # draw at 2x and average down: anti-aliased edges


def _colours(rng: np.random.Generator) -> tuple[float, bool, np.ndarray, np.ndarray]:
    """(hue, shape is the dark one, background, shape colour): one random hue per image
    (neighbours in pixel space share a hue, not a shape), the shape darker or lighter than the
    background. Colour jitter with a full hue range removes it, so it is no shortcut for
    contrastive learning."""
    hue, saturation = rng.random(), rng.uniform(0.45, 0.9)
    light, dark = colorsys.hsv_to_rgb(hue, saturation, 0.9), colorsys.hsv_to_rgb(hue, saturation, 0.35)
    dark_shape = bool(rng.random() < 0.5)
    background, shape = (light, dark) if dark_shape else (dark, light)
    return hue, dark_shape, np.array(background), np.array(shape)


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, base: np.ndarray) -> np.ndarray:
    """`base` modulated by low-contrast stripes, a checker or blotches. Few texture settings,
    so texture is no instance signature for contrastive learning to latch onto."""
    side = x.shape[0]
    angle = rng.integers(4) * np.pi / 4
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle)
    freq = float(rng.choice([3.0, 6.0]))
    kind = rng.integers(3)
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(np.pi * freq * along)
    elif kind == 1:
        t = ((np.floor(freq * along) + np.floor(freq * across)) % 2).astype(np.float32)
    else:
        cells = rng.random((int(freq) + 1, int(freq) + 1)).astype(np.float32)
        t = np.asarray(Image.fromarray(cells, mode="F").resize((side, side), Image.BILINEAR))
    return base * (0.85 + 0.2 * t[..., None])


class Drawing(NamedTuple):
    """An image and the attributes it was drawn with: captions are written from these."""

    pixels: np.ndarray  # (H, W, 3) uint8
    label: int
    hue: float  # in [0, 1), of the shape and of the background
    dark_shape: bool  # the shape is darker than the background (else lighter)
    scale: float  # the shape's radius in half image widths, in [0.45, 0.75)
    centroid: tuple[float, float]  # (x, y) centre of mass of the drawn shape; x right, y down, in [-1, 1]


def draw_shape(label: int, image_size: int, rng: np.random.Generator) -> Drawing:
    """One image of shape CLASSES[label] with random nuisances, and what was drawn."""
    side = image_size * _SUPERSAMPLE
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    hue, dark_shape, bg, fg = _colours(rng)
    background = np.clip(_background(rng, x, y, bg), 0, 1)
    scale = rng.uniform(0.45, 0.75)  # the shape must survive SimCLR's random crops
    cx, cy = rng.uniform(-0.95 + scale, 0.95 - scale, 2)
    theta = rng.uniform(-0.35, 0.35)  # upright, give or take 20 degrees
    u = (np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)) / scale
    v = (-np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)) / scale
    inside = SHAPES[CLASSES[label]](u, v)
    alpha = inside.astype(np.float32)[..., None]
    image = background * (1 - alpha) + fg * alpha
    image = image.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean((1, 3))
    centroid = (float(x[inside].mean()), float(y[inside].mean())) if inside.any() else (float(cx), float(cy))
    return Drawing((image * 255 + 0.5).astype(np.uint8), label, hue, dark_shape, scale, centroid)


def draw(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of shape CLASSES[label] with random nuisances."""
    return draw_shape(label, image_size, rng).pixels


# ----------------------------------------------------------------------------- captions

COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")  # hue sextants centred on 0, 60, ... degrees
SIZES = ((0.55, "small"), (0.65, "medium"), (1.0, "large"))  # (scale below, name)
SHAPE_WORDS = {**{name: name for name in CLASSES}, "bar_pair": "pair of bars", "ell": "L shape"}
EDGE = 0.2  # a centre of mass beyond +-EDGE (of the half width) is off centre
TEMPLATES = ("a {size} {shade} {colour} {shape} {where}",
             "{where}, a {size} {shade} {colour} {shape}",
             "there is a {size} {shade} {colour} {shape} {where} of the image",
             "a {shade} {colour} {shape}, {size}, {where}")


def colour_name(hue: float) -> str:
    return COLOURS[int(hue * len(COLOURS) + 0.5) % len(COLOURS)]


def size_name(scale: float) -> str:
    return next(name for below, name in SIZES if scale < below)


def position_phrase(x: float, y: float) -> str:
    """Where a centre of mass (x right, y down) is, as a phrase: "in the top left corner"."""
    row = "top" if y < -EDGE else "bottom" if y > EDGE else ""
    column = "left" if x < -EDGE else "right" if x > EDGE else ""
    if row and column:
        return f"in the {row} {column} corner"
    if row or column:
        return f"{'at' if row else 'on'} the {row or column}"
    return "in the centre"


def caption(drawing: Drawing, rng: np.random.Generator) -> str:
    """What `drawing` shows, in one of TEMPLATES drawn from `rng`."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(size=size_name(drawing.scale), shade="dark" if drawing.dark_shape else "light",
                           colour=colour_name(drawing.hue), shape=SHAPE_WORDS[CLASSES[drawing.label]],
                           where=position_phrase(*drawing.centroid))


def _samples(split: int, n: int, image_size: int, seed: int, captions: bool) -> Iterator[dict]:
    """Balanced labels in a seeded random order, PNG-encoded; the caption's phrasing is drawn
    from the image's RNG after the image, so writing captions leaves the pixels as they are."""
    labels = _rng(seed, split).permutation(np.arange(n) % len(CLASSES))
    for i, label in enumerate(labels.tolist()):
        rng = _rng(seed, split, i)
        drawing = draw_shape(label, image_size, rng)
        buffer = io.BytesIO()
        Image.fromarray(drawing.pixels).save(buffer, "PNG")
        sample = {"__key__": f"{i:08d}", "png": buffer.getvalue(), "cls": label}
        if captions:
            sample["txt"] = caption(drawing, rng)
        yield sample


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(list(keys))


def write_synthetic(out_dir: str, n_train: int = 10000, n_val: int = 2000, image_size: int = 32,
                    seed: int = 0, max_per_shard: int = 2000, captions: bool = False) -> dict[str, str]:
    """Write `out_dir/train/*.tar` and `out_dir/val/*.tar` (with `KEY.txt` captions when
    `captions`); returns the two directories."""
    if n_train <= 0 or n_val <= 0 or image_size <= 0:
        raise DataError(f"synthetic data needs n_train, n_val, image_size > 0; got "
                        f"{n_train}, {n_val}, {image_size}")
    dirs = {}
    for split, (name, n) in enumerate((("train", n_train), ("val", n_val))):
        directory = os.path.join(out_dir, name)
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, f"{name}-*.tar")) + [
                os.path.join(directory, SIZES_FILE)]:
            if os.path.exists(stale):  # a smaller rerun must not leave old shards behind
                os.remove(stale)
        write_shards(_samples(split, n, image_size, seed, captions), directory, prefix=name,
                     max_per_shard=max_per_shard)
        with open(os.path.join(directory, CLASSES_FILE), "w") as f:
            json.dump({c: i for i, c in enumerate(CLASSES)}, f, indent=1)
        dirs[name] = directory
    return dirs
