"""Data pipeline throughput: decoding alone against decoding + two SimCLR views, side by side.

Writes the built-in synthetic shards (PNG) to a temp dir at two resolutions, loads the encoded
bytes into memory, then measures in this one process, single-threaded:
  decode          PIL decode + RGB convert
  decode+views    the same plus two SimCLR views (32 px: CIFAR recipe, no blur; 224 px: ImageNet
                  recipe with blur), i.e. what one DataLoader worker does per image
and the whole ShardLoader (tar reading, shuffle, decode, views, collate) with --workers workers.
Prints images/s and the ratios. Usage: python benchmarks/bench_data.py [--workers 2]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from typing import Callable

import torch
from PIL import Image
from webdataset.tariterators import tarfile_samples

from sslforge.config import ViewConfig
from sslforge.data_pipeline.shards import expand_shards
from sslforge.data_pipeline.stream import ShardLoader, start_worker_server
from sslforge.data_pipeline.synth import write_synthetic
from sslforge.data_pipeline.views import build_view_transform

# (crop size, source image size, images, views)
CASES = [
    (32, 32, 3000, ViewConfig(size=32, count=2, scale=[0.08, 1.0], blur_p=0.0)),
    (224, 256, 240, ViewConfig(size=224, count=2, scale=[0.08, 1.0], blur_p=0.5)),
]


def _rate(fn: Callable[[bytes], object], encoded: list[bytes]) -> float:
    """Images per second of fn over all encoded images (after a short warm-up)."""
    for data in encoded[:5]:
        fn(data)
    start = time.perf_counter()
    for data in encoded:
        fn(data)
    return len(encoded) / (time.perf_counter() - start)


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _loader_rate(shards: list[str], transform: Callable, workers: int, n: int) -> float:
    """One epoch; the workers' fork server is already up, as in training (`start_worker_server`)."""
    loader = ShardLoader(shards, 32, transform, num_workers=workers, shuffle_buffer=256)
    start = time.perf_counter()
    seen = sum(batch["index"].numel() for batch in loader)
    assert seen >= n
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    start_worker_server()
    print(f"{'crop':>5} {'decode/s':>10} {'+2 views/s':>11} {'ratio':>7} "
          f"{'loader/s':>10} {'loader vs decode':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for crop, source, n, view in CASES:
            data = write_synthetic(f"{tmp}/{crop}", n_train=n, n_val=10, image_size=source,
                                   max_per_shard=max(n // 4, 1))
            shards = expand_shards(data["train"])
            encoded = [s["png"] for s in tarfile_samples([{"url": p} for p in shards])]
            transform = build_view_transform([view])
            decode = _rate(_decode, encoded)
            with_views = _rate(lambda b: transform(_decode(b)), encoded)
            loader = _loader_rate(shards, transform, args.workers, n)
            print(f"{crop:>5} {decode:>10.0f} {with_views:>11.0f} {decode / with_views:>6.1f}x "
                  f"{loader:>10.0f} {decode / loader:>16.1f}x")
    print(f"ratio = decode-only rate / decode+views rate (1 thread); loader = ShardLoader end to "
          f"end with {args.workers} workers ({source}px PNG sources for the 224 crop)")


if __name__ == "__main__":
    main()
