"""A classifier's correct predictions on a labelled shard set, every sample once over all ranks.

The one scoring loop of the supervised evaluations: the trainer's top-1/top-5 on `data.val` and
`sslforge eval robustness`, which scores every batch clean and under each corruption (a
`Variant`: a function of the [0, 1] crops and their sample indices, applied before the
normalisation). Each rank scores its share of the samples (`eval_batches`: contiguous,
unpadded) with the evaluation transform; counts are summed over ranks, so results do not depend
on the world size. A bad label on any rank is one error on every rank (none is left waiting in
a collective).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
from torchvision.transforms import v2

from sslforge import distributed
from sslforge.eval import EvalError
from sslforge.eval.features import with_rank0_buffers
from sslforge.launcher.env import DistEnv

Variant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (crops in [0, 1], sample index) -> crops


class Counts(NamedTuple):
    top1: list[float]  # correct predictions: clean, then under each variant
    top5: float  # clean images whose label is among the 5 highest logits
    samples: int
    skipped: int  # unreadable samples left out


def split_eval_transform(image_size: int) -> tuple[v2.Compose, v2.Normalize]:
    """The evaluation transform without its final normalisation (the [0, 1] crop that
    corruptions act on), and that normalisation."""
    from sslforge.data_pipeline.views import build_eval_transform

    steps = list(build_eval_transform(image_size).transforms)
    if not isinstance(steps[-1], v2.Normalize):
        raise RuntimeError("the evaluation transform must end with its normalisation")
    return v2.Compose(steps[:-1]), steps[-1]


def label_problem(labels: torch.Tensor, num_classes: int, shards: str) -> str | None:
    if (labels < 0).any():
        return f"classifier evaluation needs labelled shards (KEY.cls): {shards}"
    if (labels >= num_classes).any():
        return f"{shards}: label {int(labels.max())} is outside the classifier's {num_classes} classes"
    return None


@torch.no_grad()
def correct_counts(classifier: nn.Module, shards: str, image_size: int, env: DistEnv, batch_size: int,
                   workers: int, variants: Sequence[Variant] = (),
                   on_batch: Callable[[int], None] | None = None) -> Counts:
    """Counts summed over ranks; the classifier runs as given (the caller sets eval mode).
    `on_batch(n)` is told each time this rank has scored n more samples (a progress bar)."""
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.shards import expand_shards

    to_unit, normalize = split_eval_transform(image_size)
    hits = torch.zeros(2 + len(variants), dtype=torch.float64)  # top-1 clean, top-5 clean, variants
    seen = skipped = 0
    problem = None
    for batch in eval_batches(expand_shards(shards), to_unit, batch_size, env.rank, env.world_size, workers):
        images, labels = batch["image"].to(env.device), batch["label"].to(env.device)
        logits = classifier(normalize(images))
        problem = label_problem(labels, logits.shape[1], shards)
        if problem:
            break
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits[0] += float((top[:, 0] == labels).sum())
        hits[1] += float((top == labels[:, None]).any(1).sum())
        for k, variant in enumerate(variants, 2):
            hits[k] += float((classifier(normalize(variant(images, batch["index"]))).argmax(1) == labels).sum())
        seen, skipped = seen + len(labels), skipped + batch["skipped"]
        if on_batch is not None:
            on_batch(len(labels))
    problems = [p for p in distributed.all_gather_object(problem) if p]
    if problems:
        raise EvalError(problems[0])
    totals = torch.cat([hits, torch.tensor([seen, skipped], dtype=torch.float64)])
    totals = distributed.all_reduce_sum(totals.to(distributed.comm_device())).cpu().tolist()
    if totals[-2] == 0:
        raise EvalError(f"no readable samples to evaluate in {shards}")
    return Counts([totals[0], *totals[2:-2]], totals[1], int(totals[-2]), int(totals[-1]))


def classifier_accuracy(classifier: nn.Module, shards: str, image_size: int, batch_size: int, env: DistEnv,
                        workers: int) -> dict[str, float]:
    """{"top1", "top5"} in % over every readable sample of `shards`, with rank 0's buffers and
    in eval mode (the classifier's mode is restored after)."""
    model = with_rank0_buffers(classifier)
    was_training = model.training
    model.eval()
    try:
        counts = correct_counts(model, shards, image_size, env, batch_size, workers)
    finally:
        model.train(was_training)
    return {"top1": 100.0 * counts.top1[0] / counts.samples, "top5": 100.0 * counts.top5 / counts.samples}


__all__ = ["Counts", "Variant", "classifier_accuracy", "correct_counts", "split_eval_transform"]
