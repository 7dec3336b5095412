"""Whole-dataset clustering (PCL, HCSC) against the feature extraction that precedes it, per epoch.

After the warm-up, every PCL epoch starts by extracting the feature of every training sample (all
ranks in parallel) and then clusters them on one process: faiss k-means (niter 20, nredo 5) plus
the concentration, once per cluster count, while the other ranks wait. This times exactly that
(`pcl_clusterings` on random unit features, GPU faiss when faiss sees a GPU) for each count, and a
ResNet-50 eval forward on a few batches, extrapolated to n samples split over --gpus ranks, and
prints clustering / extraction for each count and for all of them (PCL runs all every epoch).
The extraction side counts the forward only (no decoding), so the ratios are upper bounds.

Full size, ImageNet-1k on one 8-GPU node:
    python benchmarks/bench_clustering.py --n 1281167 --dim 128 --clusters 25000,50000,100000 \\
        --gpus 8 --batch 256 --batches 10
HCSC's hierarchy instead: --clusters 3000,2000,1000 --hierarchical. The defaults fit a small CPU.
"""
from __future__ import annotations

import argparse
import time

import faiss
import torch
import torch.nn.functional as F
import torchvision

from sslforge.clustering import hierarchical_clusterings, pcl_clusterings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def extraction_seconds_per_sample(dim: int, batch: int, batches: int, image_size: int, device: torch.device,
                                  amp: bool) -> float:
    """A ResNet-50 with a dim-d output in eval mode, as PCL's momentum encoder extracts."""
    model = torchvision.models.resnet50(num_classes=dim).to(device).eval()
    images = torch.randn(batch, 3, image_size, image_size, device=device)

    def forward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            F.normalize(model(images).float(), dim=1)

    forward()  # warm-up: allocation, kernel selection
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        forward()
    _sync(device)
    return (time.perf_counter() - start) / (batches * batch)


def clustering_seconds(features: torch.Tensor, counts: list[int], hierarchical: bool) -> list[tuple[str, float]]:
    """(label, seconds) per PCL count, or one row for the whole HCSC hierarchy."""
    if hierarchical:
        start = time.perf_counter()
        hierarchical_clusterings(features, counts, temperature=0.2, seed=0)
        return [(f"hierarchy {','.join(map(str, counts))}", time.perf_counter() - start)]
    rows = []
    for m, k in enumerate(counts):
        start = time.perf_counter()
        pcl_clusterings(features, [k], temperature=0.2, seed=m)
        rows.append((f"k = {k}", time.perf_counter() - start))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000, help="training samples (ImageNet-1k: 1281167)")
    ap.add_argument("--dim", type=int, default=128, help="feature dimension (PCL: 128)")
    ap.add_argument("--clusters", default="250,500,1000", help="cluster counts (PCL: 25000,50000,100000)")
    ap.add_argument("--hierarchical", action="store_true", help="time HCSC's hierarchy over the counts instead")
    ap.add_argument("--gpus", type=int, default=1, help="ranks that share the extraction")
    ap.add_argument("--batch", type=int, default=8, help="extraction batch per rank")
    ap.add_argument("--batches", type=int, default=2, help="timed extraction batches")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the extraction")
    args = ap.parse_args()
    counts = [int(k) for k in args.clusters.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    per_sample = extraction_seconds_per_sample(args.dim, args.batch, args.batches, args.image_size, device, args.amp)
    extraction = per_sample * args.n / args.gpus
    features = F.normalize(torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    rows = clustering_seconds(features, counts, args.hierarchical)

    faiss_on = "GPU" if faiss.get_num_gpus() > 0 else f"CPU, {faiss.omp_get_max_threads()} threads"
    print(f"clustering vs extraction, n={args.n} x {args.dim}, niter 20, nredo 5")
    print(f"  extraction: ResNet-50 @ {args.image_size}px on {device} ({torch.get_num_threads()} threads on CPU), "
          f"batch {args.batch}{', bf16' if args.amp else ''}: {per_sample * 1000:.2f} ms/sample, "
          f"{extraction:.1f} s per epoch over {args.gpus} rank(s)")
    print(f"  clustering: faiss on {faiss_on}, rank 0 only")
    for label, seconds in rows:
        print(f"  {label:>24}: {seconds:9.2f} s   clustering/extraction = {seconds / extraction:.3f}")
    if len(rows) > 1:
        total = sum(seconds for _, seconds in rows)
        print(f"  {'all counts':>24}: {total:9.2f} s   clustering/extraction = {total / extraction:.3f}")


if __name__ == "__main__":
    main()
