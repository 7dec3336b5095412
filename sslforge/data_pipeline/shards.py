"""Webdataset shards: expanding specs to paths, counting samples, writing shards.

An ImageFolder tree becomes shards in `imagefolder.py`, which writes them through `write_shards`.

Shards follow the img2dataset layout (`KEY.jpg|png|webp`, optional `KEY.cls`, `KEY.txt`,
`KEY.json`). Sample counts come from `sizes.json` (OpenCLIP convention) when present, because
reading every tar header of a large dataset at start-up is slow.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter
from typing import Iterable

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from sslforge.data_pipeline import DataError

log = logging.getLogger("sslforge.data")

SIZES_FILE = "sizes.json"
CLASSES_FILE = "classes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Members webdataset's tar iterator skips (`__meta__` files); they are not samples.
_META = re.compile(r"__[^/]*__($|/)")


def expand_shards(spec: str) -> list[str]:
    """Paths of the shards named by `spec`: brace patterns, directories, `::`-joined lists."""
    if not spec or not spec.strip():
        raise DataError("empty shard specification")
    paths: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise DataError(f"no .tar shards in directory: {part}")
            paths.extend(found)
            continue
        expanded = list(braceexpand.braceexpand(part))
        missing = [p for p in expanded if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"shard not found: {missing[0]}{more}")
        paths.extend(expanded)
    return paths


def sample_key(member_name: str) -> str | None:
    """The sample key of a tar member, or None for members that are not sample files."""
    if _META.match(member_name):
        return None
    return base_plus_ext(member_name)[0]


def _count_samples(path: str) -> int:
    """Consecutive runs of one key, as webdataset's grouping sees them; headers only.

    A shard cut short (an interrupted copy or download) or corrupt past some point counts the
    samples before the one it breaks in, with a warning, as webdataset users expect: the run
    goes on without the rest, and the stream never reads past them. Whether the last sample
    before the break had all its files cannot be known, so it is left out too.
    """
    count, previous, intact, end = 0, None, True, 0
    try:
        with tarfile.open(path) as tar:
            for member in tar:  # raises where a member's data is cut short
                key = sample_key(member.name) if member.isreg() else None
                if key is not None and key != previous:
                    count, previous = count + 1, key
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            # tarfile stops quietly at a cut header; an intact archive goes on with zero blocks.
            # `fileobj` (no public accessor) is the archive's byte stream, decompressed if need be.
            tar.fileobj.seek(end)
            tail = tar.fileobj.read(tarfile.BLOCKSIZE)
            intact = bool(tail) and not tail.strip(b"\0")
    except (tarfile.TarError, EOFError):  # EOFError: a compressed shard cut short
        intact = False
    except OSError as exc:
        raise DataError(f"cannot read shard {path}: {exc.strerror or exc}") from None
    if not intact:
        count = max(count - 1, 0)
        log.warning("shard %s is truncated or corrupt: counting its first %d samples, skipping the rest",
                    path, count)
    return count


def shard_sizes(shards: list[str]) -> list[int]:
    """Samples per shard, from `sizes.json` next to the shard when listed, else from headers."""
    listed: dict[str, dict[str, int]] = {}
    sizes = []
    for path in shards:
        if not os.path.isfile(path):
            raise DataError(f"shard not found: {path}")
        directory, name = os.path.split(path)
        if directory not in listed:
            listed[directory] = _read_sizes(directory)
        size = listed[directory].get(name)
        sizes.append(int(size) if size is not None else _count_samples(path))
    return sizes


def _read_sizes(directory: str) -> dict[str, int]:
    path = os.path.join(directory or ".", SIZES_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            sizes = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable {path}: {exc}") from None
    if not isinstance(sizes, dict):
        raise DataError(f"{path} must map shard names to sample counts")
    return sizes


def write_json(path: str, obj: object) -> None:
    """`obj` as `path`, atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_shards(samples: Iterable[dict], out_dir: str, prefix: str = "shard",
                 max_per_shard: int = 10000, mtime: float | None = None) -> list[str]:
    """Write webdataset-layout sample dicts to `{prefix}-{i:06d}.tar`; updates `sizes.json`.
    Members are stamped with `mtime` (default: when written); a fixed one makes the same
    samples give byte-identical shards."""
    if max_per_shard <= 0:
        raise ValueError("max_per_shard must be > 0")
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    counts: Counter[str] = Counter()
    with wds.ShardWriter(pattern, maxcount=max_per_shard, verbose=0, mtime=mtime) as writer:
        for sample in samples:
            writer.write(sample)
            counts[writer.fname] += 1
    paths = sorted(counts)
    if not paths:
        os.remove(pattern % 0)  # ShardWriter opens its first shard eagerly
        raise DataError(f"no samples to write to {out_dir}")
    sizes = _read_sizes(out_dir)
    sizes.update({os.path.basename(p): n for p, n in counts.items()})
    write_json(os.path.join(out_dir, SIZES_FILE), sizes)
    return paths
