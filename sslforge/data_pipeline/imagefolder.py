"""An ImageFolder tree (SRC/CLASS/IMAGE) to webdataset shards, every image verified on the way.

Labels follow torchvision's ImageFolder: class directories sorted by name, indexed from 0, as
`KEY.cls`; `classes.json` ({name: index}, the same file `data synth` writes) sits beside the
shards of each split. A file that does not decode whole (truncated, not an image, unreadable)
is reported, listed in OUT/skipped.txt and left out: the stream would otherwise skip it anew at
every epoch, and a reader that tolerates truncation (ImageFile.LOAD_TRUNCATED_IMAGES) would
train on its grey remainder.

Images are decoded by several processes; the shard order and contents depend only on the file
list and `seed`, never on the number of workers. Without `resize` the stored bytes are the
file's own (no re-encode); with it, every image is re-encoded as JPEG, shrunk so its shorter
side is `resize` pixels (never enlarged), as ImageNet is usually sharded at a bounded size.

The shards are written into a staging directory inside OUT and moved in place only once all of
them are written: a failed or interrupted run leaves OUT as it was, and `overwrite` replaces a
previous run's shards only when the new ones are complete.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import random
import re
import shutil
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, NamedTuple, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.image_check import Bad, encode_chunk, ignore_sigint
from sslforge.data_pipeline.shards import CLASSES_FILE, IMAGE_EXTS, SIZES_FILE, write_json, write_shards

SKIPPED_FILE = "skipped.txt"
SPLITS = ("train", "val")
UNSPLIT = "shard"  # the shard prefix without --val-fraction: OUT/shard-000000.tar, ...
STAGING = ".sslforge-partial"  # where a run writes before its shards replace OUT's
_OUR_TAR = re.compile(rf"^({UNSPLIT}|{'|'.join(SPLITS)})-\d{{6}}\.tar$")
_OUR_FILES = (CLASSES_FILE, SIZES_FILE, SKIPPED_FILE)
_CHUNK = 16  # images per task sent to a worker: amortises the inter-process round trip
_IN_FLIGHT = 4  # chunks queued per worker: bounds memory while keeping every worker busy


def default_workers() -> int:
    """min(8, CPUs this process may run on): decoding scales with cores, writing is one stream."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cpus)


# ----------------------------------------------------------------------------- listing, splitting

class Listing(NamedTuple):
    """What an ImageFolder tree holds, before any file is opened."""

    classes: list[str]  # index -> class directory name
    files: list[tuple[str, int]]  # (path relative to the root, label), sorted
    ignored: int  # files under class directories without an image extension


def list_images(src: str) -> Listing:
    """Image files of an ImageFolder tree, with labels by sorted class directory."""
    if not os.path.isdir(src):
        raise DataError(f"image folder not found: {src}")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir())
    files, ignored = [], 0
    for label, name in enumerate(classes):
        for root, dirs, names in os.walk(os.path.join(src, name)):
            dirs.sort()
            for fname in sorted(names):
                if "." in fname and fname.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    files.append((os.path.relpath(os.path.join(root, fname), src), label))
                else:
                    ignored += 1
    if not files:
        raise DataError(f"no images (.jpg/.jpeg/.png/.webp) in class folders of {src}")
    return Listing(classes, files, ignored)


def split_files(files: Sequence[tuple[str, int]], val_fraction: float, seed: int
                ) -> dict[str, list[tuple[str, int]]]:
    """{"train": ..., "val": ...}, `round(val_fraction * n)` of each class's n files in val
    (stratified), each split shuffled so a shard mixes classes; with no val fraction, all files
    under the unsplit prefix. A function of the file list and `seed` only."""
    rng = random.Random(seed)
    if val_fraction == 0:
        shuffled = list(files)
        rng.shuffle(shuffled)
        return {UNSPLIT: shuffled}
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        held = math.floor(val_fraction * len(members) + 0.5)
        val += members[:held]
        train += members[held:]
    for name, part in (("train", train), ("val", val)):
        if not part:
            raise DataError(f"--val-fraction {val_fraction} leaves no {name} images among {len(files)} "
                            f"(each class's share is rounded)")
        rng.shuffle(part)
    return {"train": train, "val": val}


# ----------------------------------------------------------------------------- decoding in parallel

class Encoder:
    """Encoded images in input order, from `workers` processes (in-process for one)."""

    def __init__(self, workers: int, resize: int | None, quality: int) -> None:
        self.work = partial(encode_chunk, resize=resize, quality=quality)
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Encoder:
        # spawn: forking copies locks other threads hold, and the fork server keeps the modules of
        # whoever starts it first (the data loaders preload theirs). A caller's script needs an
        # `if __name__ == "__main__":` guard, as multiprocessing asks.
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=ignore_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, paths: Sequence[str]) -> Iterator[tuple[str, bytes] | Bad]:
        chunks = (paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK))
        if self.pool is None:
            for chunk in chunks:
                yield from self.work(chunk)
            return
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(self.pool.submit(self.work, chunk))
            if len(pending) >= _IN_FLIGHT * self.workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ----------------------------------------------------------------------------- the output directory

def _ours(name: str) -> bool:
    """A file name this writer produces (shards, its JSON files mid-write included)."""
    return bool(_OUR_TAR.match(name)) or name in _OUR_FILES or name.removesuffix(".tmp") in _OUR_FILES


def previous_output(out: str) -> tuple[list[str], list[str]]:
    """(entries of OUT an earlier run of this writer left, entries it did not write)."""
    ours, foreign = [], []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.name == STAGING:
            continue  # an interrupted run's incomplete shards: removed before writing
        if entry.is_dir(follow_symlinks=False) and entry.name in SPLITS:
            inner = sorted(e.path for e in os.scandir(entry.path)
                           if not (e.is_file(follow_symlinks=False) and _ours(e.name)))
            if inner:
                foreign += inner
            else:
                ours.append(entry.path)
        elif entry.is_file(follow_symlinks=False) and _ours(entry.name):
            ours.append(entry.path)
        else:
            foreign.append(entry.path)
    return ours, foreign


def _check_output(src: str, out: str, overwrite: bool) -> list[str]:
    """The previous shards `overwrite` replaces; DataError when OUT must not be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"output {out} exists and is not a directory")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([real_src, real_out]) == real_src:
        raise DataError(f"output {out} is inside the image folder {src}: it would be read as a class")
    if not os.path.isdir(out):
        return []
    ours, foreign = previous_output(out)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DataError(f"output directory {out} holds files `data shards` did not write ({foreign[0]}{more}); "
                        "choose an empty or new directory (nothing there is deleted, even with --overwrite)")
    if ours and not overwrite:
        names = ", ".join(os.path.basename(p) for p in ours[:3]) + (", ..." if len(ours) > 3 else "")
        raise DataError(f"output directory {out} is not empty: it holds shards of an earlier run ({names}); "
                        "pass --overwrite to replace them")
    return ours


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# ----------------------------------------------------------------------------- progress

class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} images/s", style="progress.data.speed")


class _Reporter:
    """A progress bar on stderr when it is a terminal (and not `quiet`); skipped files are
    printed above it, one line each, in any case."""

    def __init__(self, total: int, show: bool) -> None:
        console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]verifying and writing"), BarColumn(), MofNCompleteColumn(),
                                 _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                                 disable=not (show and console.is_terminal), transient=True)
        self.task = self.progress.add_task("images", total=total)

    def __enter__(self) -> _Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def done(self, count: int = 1) -> None:
        self.progress.advance(self.task, count)

    def skipped(self, path: str, reason: str) -> None:
        self.progress.console.print(f"sslforge: skipping {path}: {reason}", markup=False, highlight=False,
                                    soft_wrap=True)


# ----------------------------------------------------------------------------- the writer

@dataclass
class WrittenSplit:
    name: str  # "train", "val", or UNSPLIT
    shards: list[str]
    samples: int

    @property
    def pattern(self) -> str:
        """The brace pattern naming every shard (what data.train / data.val take)."""
        if len(self.shards) == 1:
            return self.shards[0]
        directory = os.path.dirname(self.shards[0])
        return os.path.join(directory, f"{self.name}-{{000000..{len(self.shards) - 1:06d}}}.tar")


@dataclass
class ShardReport:
    out: str
    classes: list[str]
    splits: list[WrittenSplit]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path under SRC, reason)
    ignored: int = 0

    def summary(self) -> str:
        """What the CLI prints: counts, then the shard pattern(s) to train on."""
        shards = sum(len(s.shards) for s in self.splits)
        written = sum(s.samples for s in self.splits)
        per_split = ", ".join(f"{s.name} {s.samples}" for s in self.splits if s.name in SPLITS)
        lines = [f"wrote {written} images of {len(self.classes)} classes in {shards} shard(s) to {self.out}"
                 + (f" ({per_split})" if per_split else "")]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable image(s), listed in "
                         f"{os.path.join(self.out, SKIPPED_FILE)}")
        if self.ignored:
            lines.append(f"ignored {self.ignored} file(s) without an image extension (.jpg/.jpeg/.png/.webp)")
        for split in self.splits:
            lines.append(f"data.{split.name}={split.pattern}" if split.name in SPLITS else f"shards: {split.pattern}")
        return "\n".join(lines)


def imagefolder_to_shards(src: str, out: str, max_per_shard: int = 10000, *, workers: int | None = None,
                          resize: int | None = None, quality: int = 95, val_fraction: float = 0.0,
                          seed: int = 0, overwrite: bool = False, progress: bool = False) -> ShardReport:
    """SRC/CLASS/IMAGE -> OUT/shard-*.tar, or OUT/train/train-*.tar and OUT/val/val-*.tar with a
    `val_fraction`; bad images reported and skipped (module docstring). `overwrite` replaces an
    earlier run's shards; OUT holding anything else is refused either way."""
    workers = default_workers() if workers is None else workers
    for ok, message in ((max_per_shard > 0, f"--max-per-shard must be > 0, got {max_per_shard}"),
                        (workers >= 1, f"--workers must be >= 1, got {workers}"),
                        (resize is None or resize > 0, f"--resize must be > 0, got {resize}"),
                        (1 <= quality <= 100, f"--quality must be in [1, 100], got {quality}"),
                        (0 <= val_fraction < 1, f"--val-fraction must be in [0, 1), got {val_fraction}")):
        if not ok:
            raise DataError(message)
    listing = list_images(src)
    previous = _check_output(src, out, overwrite)
    splits = split_files(listing.files, val_fraction, seed)
    created = not os.path.isdir(out)
    staging = os.path.join(out, STAGING)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    report = ShardReport(out, listing.classes, [], ignored=listing.ignored)
    try:
        with Encoder(workers, resize, quality) as encode, _Reporter(len(listing.files), progress) as reporter:
            for name, files in splits.items():
                directory = staging if name == UNSPLIT else os.path.join(staging, name)
                written, count = _write_split(src, name, files, directory, max_per_shard, listing.classes,
                                              encode, reporter, report.skipped)
                final = [os.path.join(out, os.path.relpath(p, staging)) for p in written]
                report.splits.append(WrittenSplit(name, final, count))
        if report.skipped:
            with open(os.path.join(staging, SKIPPED_FILE), "w") as f:
                f.writelines(f"{path}\t{reason}\n" for path, reason in report.skipped)
        for path in previous:  # only now: a failed run leaves the earlier shards in place
            _remove(path)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
        os.rmdir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(out):
            os.rmdir(out)
        raise
    return report


def _write_split(src: str, name: str, files: list[tuple[str, int]], directory: str, max_per_shard: int,
                 classes: list[str], encode: Callable[[Sequence[str]], Iterator[tuple[str, bytes] | Bad]],
                 reporter: _Reporter, skipped: list[tuple[str, str]]) -> tuple[list[str], int]:
    """One split's verified images as `{name}-*.tar` in `directory`, with classes.json;
    returns the shards and the number of images in them."""
    index = 0

    def samples() -> Iterator[dict]:
        nonlocal index
        for (path, label), result in zip(files, encode([os.path.join(src, p) for p, _ in files])):
            reporter.done()
            if isinstance(result, Bad):
                skipped.append((path, result.reason))
                reporter.skipped(path, result.reason)
                continue
            ext, data = result
            yield {"__key__": f"{index:09d}", ext: data, "cls": label,
                   "json": {"path": path, "class": classes[label]}}
            index += 1

    try:
        paths = write_shards(samples(), directory, prefix=name, max_per_shard=max_per_shard, mtime=0)
    except DataError:
        if index == 0:
            where = f" of the {name} split" if name in SPLITS else ""
            raise DataError(f"no readable images{where} in {src}: all {len(files)} were skipped") from None
        raise
    write_json(os.path.join(directory, CLASSES_FILE), {c: i for i, c in enumerate(classes)})
    return paths, index
