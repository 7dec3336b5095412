"""Decode-only comparison for the loader benchmark, one process, one thread: PIL full decode
against PIL's draft mode (libjpeg-turbo's scaled IDCT, 1/2, 1/4, 1/8) at the size a transform's
`decode_size` asks for, and simplejpeg (full, and reduced to at least the same size: libjpeg-
turbo's M/8 scales) when it is installed. Ratios are against PIL full decode of the same files.
"""
from __future__ import annotations

import io
import statistics
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

DecodeSize = Callable[[int, int], tuple[int, int]]
Decoder = Callable[[bytes, tuple[int, int]], tuple[int, int]]  # (bytes, full size) -> decoded size


class DecodeRow(NamedTuple):
    name: str
    ms: float  # per image, median over repeats
    pixels: float  # mean decoded pixels per image, as a share of the full size


def decode_pil(data: bytes, decode_size: DecodeSize | None) -> Image.Image:
    """PIL open (+ draft at `decode_size` when given) + RGB convert: sslforge's decode path."""
    with Image.open(io.BytesIO(data)) as image:
        if decode_size is not None:
            image.draft("RGB", decode_size(*image.size))
        return image.convert("RGB")


def pil_decoder(decode_size: DecodeSize | None) -> Decoder:
    return lambda data, _: decode_pil(data, decode_size).size


def simplejpeg_decoder(decode_size: DecodeSize | None) -> Decoder | None:
    """simplejpeg's RGB decode, reduced to at least `decode_size` when given; None if absent."""
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: bytes, size: tuple[int, int]) -> tuple[int, int]:
        width, height = decode_size(*size) if decode_size is not None else (0, 0)
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=width, min_height=height)
        return array.shape[1], array.shape[0]
    return decode


def time_decoder(decoder: Decoder, encoded: Sequence[bytes], sizes: Sequence[tuple[int, int]],
                 repeats: int) -> tuple[float, float]:
    """(ms per image, median of `repeats` passes after one warm-up pass; decoded pixel share)."""
    shares = [np.prod(decoder(data, size)) / np.prod(size) for data, size in zip(encoded, sizes)]
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data, size in zip(encoded, sizes):
            decoder(data, size)
        passes.append((time.perf_counter() - start) / len(encoded) * 1000)
    return statistics.median(passes), float(np.mean(shares))


def decode_rows(encoded: Sequence[bytes], sizes: Sequence[tuple[int, int]], targets: dict[str, DecodeSize],
                repeats: int) -> tuple[list[DecodeRow], list[str]]:
    """Rows for PIL and simplejpeg, full and at each named target size; notes on skipped rows."""
    rows, notes = [], []
    for library, make in (("PIL", pil_decoder), ("simplejpeg", simplejpeg_decoder)):
        for target, decode_size in {"full": None, **targets}.items():
            decoder = make(decode_size)
            if decoder is None:
                notes.append(f"{library} rows skipped: not installed")
                break
            ms, pixels = time_decoder(decoder, encoded, sizes, repeats)
            rows.append(DecodeRow(f"{library} {target}", ms, pixels))
    return rows, notes


def format_decode_table(groups: dict[str, tuple[list[DecodeRow], int]]) -> str:
    """One block per image group: ms/image, speed-up over PIL full decode, decoded pixel share."""
    lines = [f"{'decoder':<36} {'ms/image':>9} {'vs PIL full':>12} {'pixels decoded':>15}"]
    for group, (rows, count) in groups.items():
        lines.append(f"-- {group} ({count} images)")
        base = rows[0].ms
        lines += [f"{row.name:<36} {row.ms:>9.2f} {base / row.ms:>11.2f}x {row.pixels:>14.0%}" for row in rows]
    return "\n".join(lines)
