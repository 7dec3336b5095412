"""Decoding and damaged shards (issue 7, item 8).

16-bit greyscale PNGs decoded clipped to near-white; a truncated tar was fatal without
`sizes.json` (counting raised) but skipped with it. Both now skip and count, with the count in
the log.
"""
from __future__ import annotations

import logging
import os
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sslforge.data_pipeline.eval_stream import eval_batches
from sslforge.data_pipeline.shards import shard_sizes, write_shards
from sslforge.data_pipeline.stream import ShardLoader
from tests.data_helpers import png_colour, raw_pixels, write_uneven


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of (h, w) grey, (h, w, 2) grey+alpha, (h, w, 3) RGB or (h, w, 4) RGBA,
    written by hand: Pillow cannot write 16-bit colour."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _decoded(tmp_path: Path, images: list[bytes]) -> list[np.ndarray]:
    """The RGB pixels the eval stream decodes from these PNGs, in order."""
    shards = write_shards(({"__key__": f"{i:03d}", "png": png} for i, png in enumerate(images)), str(tmp_path))
    batches = list(eval_batches(shards, lambda image: raw_pixels(image)[0], batch_size=len(images)))
    return [image.permute(1, 2, 0).numpy() for b in batches for image in b["image"]]


def test_16_bit_pngs_decode_to_their_high_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey, grey_alpha, rgb, rgba = (rng.integers(0, 65536, (5, 7, c), dtype=np.uint16) for c in (1, 2, 3, 4))
    grey = grey[..., 0]
    decoded = _decoded(tmp_path, [png16(grey), png16(grey_alpha), png16(rgb), png16(rgba)])
    expected = [np.repeat((grey >> 8)[..., None], 3, axis=2), np.repeat(grey_alpha[..., :1] >> 8, 3, axis=2),
                rgb >> 8, rgba[..., :3] >> 8]
    for got, want in zip(decoded, expected, strict=True):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want.astype(np.uint8))


# ----------------------------------------------------------------------------- truncated shards

SIZES, CUT_SHARD, CUT_AT = [6, 6, 6], 1, 3  # the middle shard is cut inside its 4th image


def _truncate(shard: str, sample: int) -> None:
    """Cut the tar inside the image data of global sample `sample`, as an interrupted copy does."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"s{sample:05d}.png")
    with open(shard, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def _make_truncated(directory: Path, listed: bool) -> dict:
    shards = write_uneven(directory, SIZES)
    first = sum(SIZES[:CUT_SHARD])
    _truncate(shards[CUT_SHARD], first + CUT_AT)
    if not listed:
        os.remove(directory / "sizes.json")
    lost = set(range(first + CUT_AT, first + SIZES[CUT_SHARD]))
    return {"shards": shards, "listed": listed, "lost": lost, "total": sum(SIZES)}


@pytest.fixture(params=[True, False], ids=["sizes.json", "counted"])
def truncated(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    return _make_truncated(tmp_path, request.param)


def test_a_truncated_shard_without_sizes_json_counts_its_complete_samples(tmp_path: Path, caplog) -> None:
    truncated = _make_truncated(tmp_path, listed=False)
    with caplog.at_level(logging.WARNING, logger="sslforge.data"):
        sizes = shard_sizes(truncated["shards"])
    assert sizes == [6, CUT_AT, 6]
    [message] = [r.getMessage() for r in caplog.records]
    assert truncated["shards"][CUT_SHARD] in message and f"first {CUT_AT} samples" in message


def _missing(truncated: dict) -> set[int]:
    """Samples the stream cannot deliver: counted ones are never read; listed ones are skipped."""
    return truncated["lost"] if truncated["listed"] else set()


def _sample_id(truncated: dict, index: int) -> int:
    """Which written sample a stream index is: indices follow the shard sizes the stream was
    given, so after a shard counted short the later shards' indices close up."""
    kept = sorted(set(range(truncated["total"])) - truncated["lost"])
    return index if truncated["listed"] else kept[index]


def test_training_stream_skips_and_counts_a_truncated_shard(truncated: dict, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sslforge.data"):
        loader = ShardLoader(truncated["shards"], 3, raw_pixels, num_workers=0, shuffle_buffer=4)
        batches = list(loader)
    delivered = Counter(_sample_id(truncated, i) for b in batches for i in b["index"].tolist())
    assert set(delivered) == set(range(truncated["total"])) - truncated["lost"]
    assert sum(b["skipped"] for b in batches) == len(_missing(truncated))
    for batch in batches:  # every image is the one its index names (replacements included)
        for pixels, index in zip(batch["views"][0], batch["index"].tolist()):
            assert tuple(pixels[:, 0, 0].tolist()) == png_colour(_sample_id(truncated, index))
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    expected = (f"skipping {len(truncated['lost'])} of the 6" if truncated["listed"]
                else f"first {CUT_AT} samples")
    assert len(messages) == 1 and truncated["shards"][CUT_SHARD] in messages[0] and expected in messages[0]


def test_eval_stream_skips_and_counts_a_truncated_shard(truncated: dict) -> None:
    batches = list(eval_batches(truncated["shards"], lambda image: raw_pixels(image)[0], 4))
    ids = [_sample_id(truncated, i) for b in batches for i in b["index"].tolist()]
    assert sorted(ids) == sorted(set(range(truncated["total"])) - truncated["lost"])
    assert sum(b["skipped"] for b in batches) == len(_missing(truncated))
    assert all(tuple(image[:, 0, 0].tolist()) == png_colour(_sample_id(truncated, i))
               for b in batches for image, i in zip(b["image"], b["index"].tolist()))
