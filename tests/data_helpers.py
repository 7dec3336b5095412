"""Tiny shard builders shared by the data pipeline tests."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslforge.config import ViewConfig
from sslforge.data_pipeline.shards import write_shards


def png_bytes(i: int, size: int = 16) -> bytes:
    """A small image whose colour encodes `i`, so samples differ."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), png_colour(i)).save(buffer, "PNG")
    return buffer.getvalue()


def write_uneven(directory: Path, sizes: list[int], corrupt: frozenset[int] = frozenset()
                 ) -> list[str]:
    """One shard per size (prefix p0, p1, ...); global sample i has label i % 5 and
    garbage `.jpg` bytes instead of an image when i is in `corrupt`."""
    paths: list[str] = []
    first = 0
    for shard, n in enumerate(sizes):
        samples = []
        for i in range(first, first + n):
            image = {"jpg": b"not an image"} if i in corrupt else {"png": png_bytes(i)}
            samples.append({"__key__": f"s{i:05d}", "cls": i % 5, **image})
        paths += write_shards(samples, str(directory), prefix=f"p{shard}")
        first += n
    return paths


def small_views(count: int = 2, size: int = 8, **kw) -> list[ViewConfig]:
    return [ViewConfig(size=size, count=count, **kw)]


def raw_pixels(image: Image.Image) -> list:
    """A 'transform' that keeps the decoded pixels, so tests can check image <-> index."""
    return [torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)]


def png_colour(i: int) -> tuple[int, int, int]:
    """The flat colour of sample i's image."""
    return (i * 37 % 256, i * 11 % 256, i % 256)
