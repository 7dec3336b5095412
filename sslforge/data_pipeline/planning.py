"""Which samples each slot reads: shard sets, contiguous ranges, resampling, buffer order.

Plans are pure functions of the shard sizes and an RNG, computed before any byte is read, so
every slot's stream is reproducible and resuming can skip without reading.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Sequence

import numpy as np

from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.shards import shard_sizes


class Segment(NamedTuple):
    """`count` consecutive samples of one shard, from sample `start` of that shard."""

    shard: int
    start: int
    count: int


@dataclass(frozen=True)
class ShardSet:
    """Shard paths, their sizes and the global index of each shard's first sample."""

    shards: Sequence[str]
    sizes: Sequence[int]

    @classmethod
    def open(cls, shards: Sequence[str]) -> "ShardSet":
        """Checks every path in the calling (main) process; DataError names a missing one."""
        if not shards:
            raise DataError("no shards given")
        dataset = cls(list(shards), shard_sizes(list(shards)))
        if dataset.total == 0:
            raise DataError(f"shards hold no samples: {shards[0]} ...")
        return dataset

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @cached_property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.sizes)[:-1].tolist()]


def range_segments(sizes: Sequence[int], order: Sequence[int], start: int,
                    length: int) -> list[Segment]:
    """Samples [start, start+length) of the shards concatenated in `order`, wrapping around."""
    ends = np.cumsum([sizes[i] for i in order]).tolist()
    total, position, segments = ends[-1], start % ends[-1], []
    while length > 0:
        k = bisect_right(ends, position)
        within = position - (ends[k] - sizes[order[k]])
        take = min(length, sizes[order[k]] - within)
        segments.append(Segment(order[k], within, take))
        position, length = (position + take) % total, length - take
    return segments


def resampled_segments(sizes: Sequence[int], rng: np.random.Generator,
                        length: int) -> list[Segment]:
    """Whole shards drawn with replacement until `length` samples (the last one cut short)."""
    nonempty = [i for i, n in enumerate(sizes) if n > 0]
    segments = []
    while length > 0:
        shard = nonempty[rng.integers(len(nonempty))]
        take = min(length, sizes[shard])
        segments.append(Segment(shard, 0, take))
        length -= take
    return segments


def buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output position -> input position of a `buffer`-sized shuffle buffer over n items.

    Output j always comes from input < j + buffer, so streaming it holds <= buffer samples.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    buffer = min(buffer, n)
    held = list(range(buffer))
    out = np.empty(n, dtype=np.int64)
    for j, (q, pick) in enumerate(zip(range(buffer, n), rng.integers(buffer, size=n - buffer))):
        out[j], held[pick] = held[pick], q
    rng.shuffle(held)
    out[n - buffer:] = held
    return out
