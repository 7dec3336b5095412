"""Evaluation reading: every sample exactly once over all ranks, unshuffled and unpadded.

Each (rank, worker) takes a contiguous share of the samples in shard order; a corrupt sample is
dropped and counted, never duplicated, since kNN must see each val image once. With a tokenizer
(FID, R-precision of captioned sets) batches also hold `caption`, `text_ids` and `text_mask`, and
a sample without a caption is an error naming its shard and key.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sslforge.data_pipeline.captions import Text, Tokenizer, collate_text, sample_text
from sslforge.data_pipeline.planning import ShardSet, range_segments
from sslforge.data_pipeline.stream import decode_sample, make_loader, read_positions


class _EvalStream(IterableDataset):
    """Contiguous share of the un-shuffled samples per (rank, worker); bad samples dropped."""

    def __init__(self, data: ShardSet, transform: Callable, batch_size: int, rank: int,
                 world_size: int, tokenizer: Tokenizer | None = None) -> None:
        self.data, self.transform, self.batch_size = data, transform, batch_size
        self.rank, self.world_size, self.tokenizer = rank, world_size, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        total = self.data.total
        lo, hi = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
        lo, hi = lo + (hi - lo) * worker // workers, lo + (hi - lo) * (worker + 1) // workers
        if hi == lo:
            return
        order = range(len(self.data.shards))
        segments = range_segments(self.data.sizes, order, lo, hi - lo)
        good: list[tuple[torch.Tensor, int, int, Text | None]] = []
        skipped = 0
        for _, raw in read_positions(self.data, segments, np.ones(hi - lo, dtype=bool)):
            image, label = decode_sample(raw, getattr(self.transform, "decode_size", None))
            if image is None:
                skipped += 1
                continue
            text = sample_text(raw.fields, self.tokenizer, raw.key, raw.shard) if self.tokenizer else None
            good.append((self.transform(image), label, raw.index, text))
            if len(good) == self.batch_size:
                yield self._collate(good, skipped)
                good, skipped = [], 0
        if good:
            yield self._collate(good, skipped)

    def _collate(self, good: list[tuple[torch.Tensor, int, int, Text | None]], skipped: int) -> dict[str, Any]:
        images, labels, indices, texts = zip(*good)
        return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
                "index": torch.tensor(indices, dtype=torch.long), "skipped": skipped,
                **(collate_text(texts) if self.tokenizer else {})}


def eval_batches(shards: list[str], transform: Callable, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0,
                 tokenizer: Tokenizer | None = None) -> Iterator[dict[str, Any]]:
    """Every sample once over all ranks, unpadded and in shard order (ranks' counts may
    differ by one; gather by `index`); captions and their tokens too with a `tokenizer`.
    Paths are checked now, not in a worker."""
    stream = _EvalStream(ShardSet.open(shards), transform, batch_size, rank, world_size, tokenizer)
    return iter(make_loader(stream, num_workers))
