"""Streaming shard reader: per-rank, per-worker split, shuffle, decode, augment, collate.

Every (rank, DataLoader worker) pair is a *slot*; a slot's stream of samples is planned from
(seed, epoch, slot) and the shard sizes alone, so it never depends on what other slots read:

- finite mode (DistributedSampler's contract): the epoch's shard order is shuffled; the
  concatenation is padded by wrapping to `L * num_slots` samples, `L` a multiple of the batch
  size, and slot s reads [s*L, (s+1)*L). Every rank gets the same number of full batches.
- resampled mode: each slot draws shards with replacement until it has `L` samples.

The shuffle buffer's permutation is a function of the stream length and its RNG only, so it is
computed up front: resuming after k batches skips the samples those batches used without
reading their bytes, and the rest of the epoch is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import io
import logging
import math
import multiprocessing
import random
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.captions import Text, Tokenizer, collate_text, sample_text
from sslforge.data_pipeline.planning import (Segment, ShardSet, buffer_shuffle_order, range_segments,
                                             resampled_segments)
from sslforge.data_pipeline.shards import IMAGE_EXTS, sample_key
from sslforge.launcher.watchdog import kill_data_workers_at_exit

log = logging.getLogger("sslforge.data")

# Independent random streams derived from (seed, epoch, slot, purpose).
_SHARD_ORDER, _RESAMPLE, _SHUFFLE, _AUGMENT = range(4)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _torch_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------- reading

class _Raw(NamedTuple):
    """One undecoded sample; `fields` is None when its shard could not deliver it."""

    index: int
    key: str
    shard: str
    fields: dict[str, Any] | None


class _EndOfRange(Exception):
    """Raised by the member selector to stop reading a shard past the last wanted sample."""


def _stop_at_end_of_range(exn: Exception) -> bool:
    """webdataset error handler: `False` ends the tar iteration quietly; real errors propagate."""
    if isinstance(exn, _EndOfRange):
        return False
    raise exn


def _read_segment(data: ShardSet, segment: Segment, wanted: np.ndarray) -> Iterator[_Raw]:
    """The samples at `wanted` offsets (sorted, within the segment), skipping the others'
    bytes; if the shard ends early or breaks, the missing ones come back without fields."""
    path = data.shards[segment.shard]
    ordinals = (segment.start + wanted).tolist()
    base = data.offsets[segment.shard]
    chosen, last = set(ordinals), ordinals[-1]
    state = {"key": None, "ordinal": -1}

    def select(name: str) -> bool:
        key = sample_key(name)
        if key is None:
            return False
        if key != state["key"]:
            state["key"], state["ordinal"] = key, state["ordinal"] + 1
        if state["ordinal"] > last:
            raise _EndOfRange()
        return state["ordinal"] in chosen

    delivered, problem = 0, ""
    try:
        samples = tarfile_samples([{"url": path}], handler=_stop_at_end_of_range,
                                  select_files=select)
        for ordinal, fields in zip(ordinals, samples):
            yield _Raw(base + ordinal, fields["__key__"], path, fields)
            delivered += 1
        problem = f"it ends after {state['ordinal'] + 1} samples"
    except Exception as exc:  # a broken shard must not stop training: its samples are skipped
        problem = f"unreadable: {exc}"
    if delivered < len(ordinals):  # one line per shard, with the count (decode_sample is quiet)
        log.warning("shard %s is truncated or corrupt (%s): skipping %d of the %d samples wanted "
                    "from it", path, problem, len(ordinals) - delivered, len(ordinals))
    for ordinal in ordinals[delivered:]:
        yield _Raw(base + ordinal, f"#{ordinal}", path, None)


def read_positions(data: ShardSet, segments: Sequence[Segment],
                    needed: np.ndarray) -> Iterator[tuple[int, _Raw]]:
    """(stream position, sample) for the needed positions of the stream `segments` describe."""
    position = 0
    for segment in segments:
        wanted = np.flatnonzero(needed[position:position + segment.count])
        if len(wanted):
            for offset, raw in zip(wanted.tolist(), _read_segment(data, segment, wanted)):
                yield position + offset, raw
        position += segment.count


DecodeSize = Callable[[int, int], tuple[int, int]]


def decode_sample(raw: _Raw, decode_size: DecodeSize | None = None) -> tuple[Image.Image | None, int]:
    """(8-bit RGB image or None if missing/corrupt, label or -1); a bad sample is logged once
    (an unreadable one by `_read_segment`, once per shard). `decode_size(width, height)` is the
    least size the caller needs: a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps it at least that large (PIL's draft mode: libjpeg-turbo's scaled IDCT); other formats
    decode whole."""
    label = -1
    if raw.fields is None:
        return None, label
    if "cls" in raw.fields:
        try:
            label = int(raw.fields["cls"])
        except ValueError:
            log.warning("sample %s of shard %s: bad .cls %r", raw.key, raw.shard, raw.fields["cls"])
    encoded = next((raw.fields[e] for e in IMAGE_EXTS if e in raw.fields), None)
    if encoded is None:
        log.warning("skipping sample %s of shard %s: no image", raw.key, raw.shard)
        return None, label
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if decode_size is not None and image.format == "JPEG":
                image.draft("RGB", decode_size(*image.size))
            if image.mode.startswith("I"):  # 16-bit greyscale: convert() would clip it to white
                image = Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
            return image.convert("RGB"), label
    except Exception as exc:  # PIL raises many types for corrupt data
        log.warning("skipping corrupt sample %s of shard %s: %s", raw.key, raw.shard, exc)
        return None, label


# ----------------------------------------------------------------------------- training stream

class _Item(NamedTuple):
    position: int  # in the slot's post-shuffle stream; keys the augmentation RNG
    index: int
    image: Image.Image | None
    label: int
    text: Text | None  # with a tokenizer: the caption and its tokens, kept with the image


class _Lookahead:
    """An iterator of decoded items that can search ahead for the next good image."""

    def __init__(self, items: Iterator[_Item]) -> None:
        self.items, self.ahead = items, deque()

    def take(self, n: int) -> list[_Item]:
        out = [self.ahead.popleft() for _ in range(min(n, len(self.ahead)))]
        # range first, so zip never pulls an item it then drops
        out += [item for _, item in zip(range(n - len(out)), self.items)]
        return out

    def next_good(self) -> _Item | None:
        for item in self.ahead:
            if item.image is not None:
                return item
        for item in self.items:
            self.ahead.append(item)
            if item.image is not None:
                return item
        return None


def _replacements(batch: list[_Item], ahead: _Lookahead, last_good: _Item | None) -> list[_Item]:
    """Each bad item becomes the previous good one of its batch, else the next good one of the
    slot stream, else the slot's last good one. Only the last rule looks before the batch, so
    a resumed epoch replaces exactly as an uninterrupted one unless nothing good follows."""
    out: list[_Item] = []
    previous = None
    for i, item in enumerate(batch):
        if item.image is not None:
            previous = item
            out.append(item)
            continue
        source = previous or next((b for b in batch[i + 1:] if b.image is not None), None)
        source = source or ahead.next_good() or last_good
        if source is None:
            raise DataError("no decodable image in this worker's share of the shards")
        out.append(source._replace(position=item.position))
    return out


@dataclass
class _Plan:
    """What one slot reads in one epoch: segments, their length and the shuffle permutation."""

    segments: list[Segment]
    order: np.ndarray  # output position -> input position


class _TrainStream(IterableDataset):
    """Yields this worker's collated batches; state (epoch, skip) is set before iteration."""

    def __init__(self, data: ShardSet, batch_size: int, transform: Callable, mode: str,
                 batches_per_slot: int, shuffle_buffer: int, workers: int, seed: int,
                 rank: int, world_size: int, require_labels: bool = False,
                 tokenizer: Tokenizer | None = None) -> None:
        self.data, self.batch_size, self.transform, self.mode = data, batch_size, transform, mode
        self.require_labels, self.tokenizer = require_labels, tokenizer
        self.batches_per_slot, self.shuffle_buffer = batches_per_slot, shuffle_buffer
        self.workers, self.seed, self.rank, self.world_size = workers, seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0

    @property
    def slot_length(self) -> int:
        return self.batches_per_slot * self.batch_size

    def plan(self, epoch: int, slot: int) -> _Plan:
        length = self.slot_length
        if self.mode == "finite":
            order = _rng(self.seed, epoch, _SHARD_ORDER).permutation(len(self.data.shards))
            segments = range_segments(self.data.sizes, order, slot * length, length)
        else:
            segments = resampled_segments(
                self.data.sizes, _rng(self.seed, epoch, slot, _RESAMPLE), length)
        shuffle = buffer_shuffle_order(length, self.shuffle_buffer,
                                        _rng(self.seed, epoch, slot, _SHUFFLE))
        return _Plan(segments, shuffle)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader hands batch j to worker j % W; after skipping k batches the first batch
        # must come from the worker that produced batch k, so roles rotate by k.
        logical = (physical + self.skip_batches) % self.workers
        done = (self.skip_batches - logical + self.workers - 1) // self.workers
        slot = self.rank * self.workers + logical
        yield from self._batches(self.epoch, slot, done * self.batch_size)

    def _batches(self, epoch: int, slot: int, skip: int) -> Iterator[dict[str, Any]]:
        plan = self.plan(epoch, slot)
        needed = np.zeros(self.slot_length, dtype=bool)
        needed[plan.order[skip:]] = True
        ahead = _Lookahead(self._items(plan, needed, skip))
        last_good = None
        while batch := ahead.take(self.batch_size):
            items = _replacements(batch, ahead, last_good)
            last_good = items[-1]
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                views = []
                for item in items:
                    # CPU generator only: torch.manual_seed would also queue a CUDA
                    # re-seed with a captured stack trace, ~1 ms per sample. Python's and
                    # numpy's global generators too: timm's RandAugment and random erasing
                    # draw from them.
                    seed = _torch_seed(self.seed, epoch, slot, _AUGMENT, item.position)
                    torch.default_generator.manual_seed(seed)
                    random.seed(seed)
                    np.random.seed(seed % 2**32)
                    views.append(self.transform(item.image))
            yield {
                "views": [torch.stack(crops) for crops in zip(*views)],
                "label": torch.tensor([item.label for item in items], dtype=torch.long),
                "index": torch.tensor([item.index for item in items], dtype=torch.long),
                "skipped": sum(item.image is None for item in batch),
                **(collate_text([item.text for item in items]) if self.tokenizer else {}),
            }

    def _items(self, plan: _Plan, needed: np.ndarray, skip: int) -> Iterator[_Item]:
        """Decoded samples in shuffled order from output position `skip` on; holds at most
        a shuffle buffer's worth of undecoded samples."""
        reader = read_positions(self.data, plan.segments, needed)
        held: dict[int, _Raw] = {}
        for position in range(skip, len(plan.order)):
            wanted = int(plan.order[position])
            while wanted not in held:
                at, raw = next(reader)
                held[at] = raw
            raw = held.pop(wanted)
            image, label = decode_sample(raw, getattr(self.transform, "decode_size", None))
            if self.require_labels and image is not None and label < 0:
                raise DataError(f"sample {raw.key} of shard {raw.shard} has no label (a .cls field "
                                "holding an integer), and this method trains on labels")
            text = None
            if self.tokenizer is not None and image is not None:
                text = sample_text(raw.fields, self.tokenizer, raw.key, raw.shard)
            yield _Item(position, raw.index, image, label, text)


class ShardLoader:
    """Batches of augmented views for one rank; same batch count on every rank, every epoch.

    Batch keys: `views`, `label`, `index`, `skipped`; with a `tokenizer` (captioned methods) also
    `caption`, `text_ids`, `text_mask` (`data_pipeline/captions.py`), and a sample without a
    caption stops the run naming its shard and key."""

    def __init__(self, shards: list[str], batch_size: int, transform: Callable, *,
                 mode: str = "finite", samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 1000, num_workers: int = 2, seed: int = 0,
                 rank: int = 0, world_size: int = 1, require_labels: bool = False,
                 tokenizer: Tokenizer | None = None, pin_memory: bool = False) -> None:
        if mode not in ("finite", "resampled"):
            raise ValueError(f"mode must be 'finite' or 'resampled', not {mode!r}")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"bad loader geometry: batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, num_workers={num_workers}")
        if mode == "resampled" and not samples_per_epoch:
            raise ValueError("samples_per_epoch is required in resampled mode")
        data = ShardSet.open(shards)
        workers = max(num_workers, 1)
        slots = world_size * workers
        if mode == "finite":
            per_slot = math.ceil(data.total / (slots * batch_size))
            self.repeats_per_epoch = per_slot * batch_size * slots - data.total
        else:
            per_slot = math.ceil(samples_per_epoch / (slots * batch_size))
            self.repeats_per_epoch = 0  # sampling with replacement: repeats are random
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._stream = _TrainStream(data, batch_size, transform, mode, per_slot, shuffle_buffer,
                                    workers, seed, rank, world_size, require_labels, tokenizer)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Start `epoch`, resuming after `skip_batches` batches this rank already consumed."""
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches={skip_batches} outside [0, {len(self)}]")
        self._stream.epoch, self._stream.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return self._stream.workers * self._stream.batches_per_slot

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from make_loader(self._stream, self.num_workers, self.pin_memory)


def _leave_signals_to_trainer(worker_id: int) -> None:
    """SIGTERM (preemption, scancel, requeue) and SIGINT (Ctrl-C reaches a terminal's whole
    process group) are for the training process, which checkpoints the current step and exits;
    a worker dying first would turn that into a crash."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Data workers start from a fork server: a fresh single-threaded interpreter that imported the
# pipeline once. Forking the training process itself copies the locks its threads (gloo, the
# rendezvous store, the watchdog, wandb, a previous loader's queue feeders) hold at that instant,
# and a worker that needs one waits forever: seen as a rank stuck at its final evaluation.
# omegaconf: a rank's main module (sslforge.launcher.worker) imports it, and each worker runs that
# module again as __mp_main__ when it starts.
WORKER_MODULES = ["sslforge.data_pipeline.stream", "sslforge.data_pipeline.eval_stream", "sslforge.data_pipeline.views",
                  "omegaconf"]
WORKER_TIMEOUT_S = 600  # no batch from the workers for this long: a stuck worker, an error not a hang


def _worker_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_MODULES)
    return context


def start_worker_server() -> None:
    """Start the data workers' fork server now (its imports take seconds), so that it gets ready
    while the caller builds its model; later loaders only fork from it."""
    _worker_context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


def make_loader(stream: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches come collated from the stream, by workers forked from a clean server
    (`start_worker_server`). The DataLoader draws its workers' base seed from a private
    generator: all randomness here is seeded per sample, and the caller's global RNG must not
    advance because data was loaded. Workers that ignore SIGTERM would block multiprocessing's
    exit hook forever, so this process kills them at exit instead. `pin_memory` (CUDA): batches
    land in page-locked memory, so the copy to the device can overlap the step (non_blocking)."""
    if not num_workers:
        return DataLoader(stream, batch_size=None, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
    kill_data_workers_at_exit()
    return DataLoader(stream, batch_size=None, num_workers=num_workers, multiprocessing_context=_worker_context(),
                      timeout=WORKER_TIMEOUT_S, worker_init_fn=_leave_signals_to_trainer, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))
