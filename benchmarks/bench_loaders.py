"""Loader race on ImageNet-size JPEGs: sslforge's ShardLoader against torchvision ImageFolder +
DataLoader and webdataset's WebLoader, in one run on the same files, plus decode-only speeds.

Draws the JPEGs once into a temp dir (`loader_images.py`: ImageNet's shapes plus a share of
1024-1600 px ones, quality 90, 4:2:0), as an ImageFolder tree and as shards of the same bytes.
For SimCLR's views (2x224) and DINO's (2x224 + 8x96), as `sslforge train` builds them from the
recipes, times `--repeats` full passes of each loader (`loader_pipelines.py`), `--workers`
workers, batch 32, after one short warm-up pass per loader, the three loaders' passes interleaved
so a shared machine's load falls on all alike. Each pass is split into the steady images/s (the
headline: what an ImageNet epoch sees) and the fixed start-up of its workers (reported beside).
Then PIL/simplejpeg decode speeds (`loader_decode.py`) and, with --profile, the per-stage CPU
cost of one image (`loader_profile.py`). Every loader's worker processes are checked to be gone.

Usage: python benchmarks/bench_loaders.py [--workers 2] [--images 384] [--repeats 3] [--profile]
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing import forkserver, resource_tracker
from typing import Any, NamedTuple

import PIL
import PIL.features
import psutil
import torch
import torchvision
import webdataset

from sslforge.data_pipeline.views import build_eval_transform, build_view_transform

from loader_decode import decode_rows, format_decode_table
from loader_images import Dataset, write_dataset
from loader_pipelines import BATCH, Loader, imagefolder_loader, sslforge_loader, webdataset_loader
from loader_profile import format_profile, profile_sslforge, profile_torchvision

CASES = {"SimCLR 2x224": "simclr", "DINO 2x224+8x96": "dino"}  # case -> recipe
LOADERS = ("ShardLoader", "ImageFolder", "WebLoader")
WARMUP_BATCHES = 2
LARGE = 500  # a long side above this is a "large" image in the decode table


def recipe_views(recipe: str) -> list[Any]:
    """The views `sslforge train RECIPE` would use: the recipe's `data.views`, else the method's."""
    # imported here: fork-server workers re-import this script each epoch (the methods: ~1 s)
    from omegaconf import OmegaConf

    from sslforge.config import load_config
    from sslforge.methods import method_class

    cfg = load_config(recipe)
    views = list(cfg.data.views) or method_class(cfg.method.name).views(cfg)
    return [OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for v in views]


def build_loaders(data: Dataset, views: list[Any], workers: int) -> dict[str, Loader]:
    return {"ShardLoader": sslforge_loader(data.shards, views, workers),
            "ImageFolder": imagefolder_loader(data.folder, views, workers),
            "WebLoader": webdataset_loader(data.shards, views, workers)}


class Pass(NamedTuple):
    """One full pass of a loader over the images, split into its epoch start and steady state."""

    steady: float  # images/s once every worker has delivered its first batch
    start: float  # s the workers took to start (estimated: see `timed_pass`)
    full: float  # images/s over the whole pass, start-up included


def timed_pass(loader: Loader, epoch: int, workers: int) -> Pass:
    """Time a full pass. When the first batch arrives, each of the W workers (started together,
    equally fast) has about one batch done, so the remaining N - W*B images take the rest of
    the pass: their rate is the steady one, and the first batch's wait less the time one batch
    takes a worker at that rate is the start-up every epoch pays (a fixed cost: nothing in an
    ImageNet epoch, a large part of a pass over a few hundred images)."""
    start, first, images = time.perf_counter(), 0.0, 0
    for crops in loader(epoch):
        images += len(crops[0])
        first = first or time.perf_counter() - start
    total = time.perf_counter() - start
    primed = BATCH * max(workers, 1)
    steady = (images - primed) / (total - first)
    return Pass(steady, first - primed / steady, images / total)


def warm_up(loader: Loader) -> None:
    """A few batches, then the iterator closed (its workers shut down): starts the fork server,
    fills the page cache and the workers' lazy imports before any timed pass."""
    batches = loader(0)
    for _ in zip(range(WARMUP_BATCHES), batches):
        pass
    batches.close()


def leftover_workers() -> list[psutil.Process]:
    """Descendant processes still alive 10 s after the loaders finished, other than the fork
    server (which stays for later loaders) and multiprocessing's resource tracker."""
    keep = {getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None)}
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    return psutil.wait_procs(procs, timeout=10)[1]


def race(data: Dataset, views: list[Any], workers: int, repeats: int) -> dict[str, list[Pass]]:
    """Each loader's timed passes, interleaved: pass r of every loader, then pass r + 1."""
    loaders = build_loaders(data, views, workers)
    for loader in loaders.values():
        warm_up(loader)
    passes: dict[str, list[Pass]] = {name: [] for name in loaders}
    for epoch in range(1, repeats + 1):  # epoch 0 warmed up
        for name, loader in loaders.items():
            passes[name].append(timed_pass(loader, epoch, workers))
    return passes


def _median(passes: list[Pass], field: str) -> float:
    return statistics.median(getattr(p, field) for p in passes)


def format_race(results: dict[str, dict[str, list[Pass]]]) -> str:
    """Steady images/s, median [min-max], and ShardLoader's ratios; then per-epoch start-up and
    the whole-pass rates, start-up included."""
    head = "".join(f"{name:>19}" for name in LOADERS)
    lines = [f"{'case':<17}{head}{'vs ImageFolder':>16}{'vs WebLoader':>14}"]
    for case, passes in results.items():
        median = {name: _median(p, "steady") for name, p in passes.items()}
        spread = {n: [p.steady for p in passes[n]] for n in LOADERS}
        cells = "".join(f"{f'{median[n]:.1f} [{min(spread[n]):.0f}-{max(spread[n]):.0f}]':>19}" for n in LOADERS)
        lines.append(f"{case:<17}{cells}{median['ShardLoader'] / median['ImageFolder']:>15.2f}x"
                     f"{median['ShardLoader'] / median['WebLoader']:>13.2f}x")
    lines += ["", "epoch start-up (s) / whole pass incl. start-up (images/s), medians:"]
    for case, passes in results.items():
        start = {n: _median(passes[n], "start") for n in LOADERS}
        full = {n: _median(passes[n], "full") for n in LOADERS}
        cells = "".join(f"{f'{start[n]:.2f} s / {full[n]:.1f}':>19}" for n in LOADERS)
        lines.append(f"{case:<17}{cells}{full['ShardLoader'] / full['ImageFolder']:>15.2f}x"
                     f"{full['ShardLoader'] / full['WebLoader']:>13.2f}x")
    return "\n".join(lines)


def decode_table(data: Dataset, views: dict[str, list[Any]], repeats: int) -> str:
    """Decode-only rows for the ~500 px images and the large ones, at full size and at the sizes
    the SimCLR and DINO view sets and a 224 px eval centre crop ask for."""
    targets = {f"reduced for {case.split()[0]} views": build_view_transform(v).decode_size
               for case, v in views.items()}
    targets["reduced for eval 224"] = build_eval_transform(224).decode_size
    groups, notes = {}, set()
    for group, large in (("ImageNet shapes, long side <= 500", False), ("large, long side 1024-1600", True)):
        picked = [(e, s) for e, s in zip(data.encoded, data.sizes) if (max(s) > LARGE) == large]
        if picked:
            encoded, sizes = zip(*picked)
            rows, skipped = decode_rows(encoded, sizes, targets, repeats)
            groups[group] = (rows, len(picked))
            notes.update(skipped)
    return format_decode_table(groups) + "".join(f"\n({note})" for note in notes)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_facts(args: argparse.Namespace) -> str:
    jpeg = PIL.features.version("libjpeg_turbo") if PIL.features.check_feature("libjpeg_turbo") else "libjpeg"
    try:
        import simplejpeg
        simple = f", simplejpeg {simplejpeg.__version__}"
    except ImportError:
        simple = ", simplejpeg not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{datetime.date.today()}  {cpu_model()}, {os.cpu_count()} cores "
            f"({len(os.sched_getaffinity(0))} usable), no GPU used; load average {load}\n"
            f"workers {args.workers}, batch {BATCH}, {args.images} images, median of {args.repeats} passes; "
            f"DataLoader default start method: {multiprocessing.get_start_method()}\n"
            f"Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Pillow {PIL.__version__} (libjpeg-turbo {jpeg}), webdataset {webdataset.__version__}{simple}")


def describe(data: Dataset) -> str:
    large = sum(max(s) > LARGE for s in data.sizes)
    kb = sum(map(len, data.encoded)) / len(data.encoded) / 1024
    bpp = sum(len(e) * 8 / (s[0] * s[1]) for e, s in zip(data.encoded, data.sizes)) / len(data.encoded)
    return (f"{len(data.encoded)} JPEGs (q90, 4:2:0): {len(data.encoded) - large} ImageNet-shaped "
            f"(500x375, 500x333, 375x500, 500x500), {large} with a 1024-1600 px long side; "
            f"mean {kb:.0f} KB, {bpp:.2f} bits/pixel; {len(data.shards)} shards")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=384, help="rounded up to whole batches per worker")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-share", type=float, default=0.2, help="share of 1024-1600 px images")
    ap.add_argument("--profile", action="store_true", help="also a single-process per-stage breakdown")
    ap.add_argument("--profile-images", type=int, default=96)
    args = ap.parse_args()
    per_pass = BATCH * max(args.workers, 1)  # no padding: every loader delivers each image once
    args.images = max(2, -(-args.images // per_pass)) * per_pass  # a first batch per worker, then more
    return args


def main() -> None:
    args = parse_args()
    print(machine_facts(args), flush=True)
    views = {case: recipe_views(recipe) for case, recipe in CASES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = write_dataset(tmp, args.images, large_share=args.large_share, shards=4 * max(args.workers, 1))
        print(f"{describe(data)} (written in {time.perf_counter() - start:.0f} s)\n", flush=True)
        results = {}
        for case, case_views in views.items():
            results[case] = race(data, case_views, args.workers, args.repeats)
            print(f"{case}, steady images/s per pass: "
                  + ", ".join(f"{n} {[round(p.steady, 1) for p in ps]}" for n, ps in results[case].items()), flush=True)
        left = leftover_workers()
        print(f"\nsteady images/s, median [min-max] of {args.repeats} passes, {args.workers} workers:")
        print(format_race(results))
        print(f"data worker processes left running after the race: {len(left)}")
        for proc in left:
            proc.kill()
        print(f"\ndecode only, 1 process, median of {args.repeats} passes:")
        print(decode_table(data, views, args.repeats))
        if args.profile:
            torch.set_num_threads(1)  # as in a DataLoader worker
            encoded = data.encoded[:args.profile_images]
            for case, case_views in views.items():
                print()
                print(format_profile(case, profile_sslforge(case_views, encoded),
                                     profile_torchvision(case_views, encoded), len(os.sched_getaffinity(0))))
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
