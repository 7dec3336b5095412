"""One image file decoded whole: the bytes a shard stores for it, or why it cannot be used.

The shard writer's worker processes run this; it imports Pillow and numpy only, so a worker
starts in a fraction of a second (webdataset, which the writer uses, imports torch).
"""
from __future__ import annotations

import io
import signal
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # the shard extension of a decoded format


class Bad(NamedTuple):
    """Why a file is left out (one line, shown to the user and written to skipped.txt)."""

    reason: str


def rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB as the stream reader decodes it: 16-bit greyscale scaled, not clipped to white."""
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
    return image.convert("RGB")


def shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    """`size` scaled so its shorter side is `side`, aspect kept; never enlarged."""
    width, height = size
    if min(width, height) <= side:
        return size
    if width <= height:
        return side, max(1, round(height * side / width))
    return max(1, round(width * side / height)), side


def encode_image(path: str, resize: int | None, quality: int) -> tuple[str, bytes] | Bad:
    """(shard extension, bytes) of one file after a full decode, or why it cannot be used.

    Without `resize`, the file's own bytes, under the extension of the format they decode as (a
    PNG named .jpg is stored as .png). With it, shrunk by `shorter_side_to` and re-encoded as
    JPEG at `quality`. Pillow refuses truncated data unless ImageFile.LOAD_TRUNCATED_IMAGES is
    set, and nothing here sets it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if resize is None:
                fallback = path.rsplit(".", 1)[-1].lower().replace("jpeg", "jpg")
                return FORMAT_EXT.get(image.format or "", fallback), data
            rgb = rgb8(image)
    except UnidentifiedImageError:
        return Bad("not an image (no format Pillow reads)")
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        return Bad(str(exc).strip() or type(exc).__name__)
    size = shorter_side_to(rgb.size, resize)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=quality)
    return "jpg", buffer.getvalue()


def encode_chunk(paths: Sequence[str], resize: int | None, quality: int) -> list[tuple[str, bytes] | Bad]:
    """`encode_image` of each path: one task of a worker process."""
    return [encode_image(p, resize, quality) for p in paths]


def ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them: one message, not one per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
