"""False-negative cancellation (Huynh et al., 2022), distributed-aware.

SimCLR's negatives include other images of the anchor's class. FNC finds them with extra
"support" views of each image: a candidate that looks like some view of the anchor's image is
probably the same thing. For sample i with views v (its two anchor views and its support
views) and every anchor view c of another sample of the global batch,

    score_ic = max_v cos(v, c),    F_i = top-k_c(score_ic)  ∩  {c : score_ic > threshold}

and then, for anchor a (view 0 or 1 of sample i), s_ac = cos(a, c) / T over the 2B anchor
views c != a of the global batch and p the other anchor view of sample i:

    attraction:  L_a = -(s_ap + sum_{f in F_i} s_af) / (1 + |F_i|) + log sum_{c != a} e^{s_ac}
    elimination: L_a = -s_ap + log sum_{c != a, c not in F_i} e^{s_ac}

The loss is the mean over this rank's 2b anchors, so the mean over ranks (what the trainer's
gradient averaging optimises) is the loss of the global batch. With no false negative (a
threshold above 1) both modes are SimCLR's NT-Xent (`nt_xent`), at the same scale.

Following google-research/fnc (objective.py `add_contrastive_loss`): the score is the max over
all of the image's views, anchor views included; the false-negative set belongs to the image and
serves both its anchor views; attraction keeps F in the denominator; the threshold is strict.
Unlike it: the loss is the mean over anchors (the official sums its views' means times 2/V:
twice this); support views only score candidates (there they are also anchors, positives and
negatives of a (2+S)-view loss, which then no longer reduces to NT-Xent); candidates are the 2B
anchor views (there all (2+S)B views); and there is no memory bank (its default run scores and
contrasts against 16 x B features of an EMA encoder, EMA 0.999): candidates are the current
global batch, as in the official loss without memory (memory_multiplier 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.contrastive import positive_and_negative_logits
from sslforge.losses.precision import float32_loss

MODES = ("attraction", "elimination")


def _check(name: str, views: Sequence[torch.Tensor], topk: int) -> None:
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        count = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
        raise ValueError(f"{name}: views must be a list of >= 2 tensors (two anchor views, then "
                         f"support views), got {count}")
    shape = tuple(views[0].shape)
    if len(shape) != 2 or shape[0] == 0 or any(tuple(v.shape) != shape for v in views):
        raise ValueError(f"{name}: every view must be the same (b, d) with b >= 1, got "
                         f"{[tuple(v.shape) for v in views]}")
    if topk < 0:
        raise ValueError(f"{name}: topk must be >= 0, got {topk}")


def _false_negatives(views: Sequence[torch.Tensor], topk: int, threshold: float) -> torch.Tensor:
    """(b, 2B) bool mask of F_i over the global batch's anchor views (no gradient)."""
    views = [F.normalize(v.detach(), dim=1) for v in views]
    b = len(views[0])
    keys = torch.cat([distributed.all_gather(views[0]), distributed.all_gather(views[1])])  # (2B, d)
    scores = views[0] @ keys.T  # (b, 2B), then the max over views, one view at a time
    for view in views[1:]:
        scores = torch.maximum(scores, view @ keys.T)
    rows = torch.arange(b, device=keys.device)
    own = rows + distributed.rank() * b
    scores[rows, own] = float("-inf")  # the sample's own views are never candidates
    scores[rows, own + len(keys) // 2] = float("-inf")
    top = torch.zeros_like(scores, dtype=torch.bool)
    top.scatter_(1, scores.topk(min(topk, scores.shape[1]), dim=1).indices, True)
    return top & (scores > threshold)


@float32_loss
@torch.no_grad()
def fnc_false_negatives(views: Sequence[torch.Tensor], topk: int = 10, threshold: float = 0.7) -> torch.Tensor:
    """F_i of this rank's b samples (see the module docstring), as a (b, 2B) bool mask over the
    global batch's anchor views: columns r*b + j are view 0 of rank r's sample j, B + r*b + j its
    view 1. Arguments as `fnc_loss`. For inspection and logging; `fnc_loss` computes it itself."""
    _check("fnc_false_negatives", views, topk)
    return _false_negatives(views, topk, threshold)


@float32_loss
def fnc_loss(views: Sequence[torch.Tensor], temperature: float = 0.1, topk: int = 10,
             threshold: float = 0.7, mode: str = "attraction") -> torch.Tensor:
    """Mean FNC loss over this rank's 2b anchors; candidates and negatives from all ranks.

    views: V >= 2 tensors (b, d), projections of this rank's b images (not yet normalised):
    views[0], views[1] are SimCLR's two anchor views (gradient flows, also through the gathered
    copies); views[2:] are support views, only used to find false negatives (detached; compute
    them under no_grad to save memory). topk, threshold: the official fn_topk 10 and
    fn_threshold 0.7, temperature 0.1. mode: "attraction" (false negatives become positives, the
    official code) or "elimination" (removed from the denominator).
    """
    _check("fnc_loss", views, topk)
    if mode not in MODES:
        raise ValueError(f"fnc_loss: mode must be one of {MODES}, got {mode!r}")
    if temperature <= 0:
        raise ValueError(f"fnc_loss: temperature must be > 0, got {temperature}")
    with torch.no_grad():
        found = _false_negatives(views, topk, threshold).repeat(2, 1)  # (2b, 2B): a sample's views share F
    positive, negative = positive_and_negative_logits(views[0], views[1], temperature)  # (2b,), (2b, 2B)
    if mode == "elimination":
        negative = negative.masked_fill(found, float("-inf"))
    log_denominator = torch.logsumexp(torch.cat([positive.unsqueeze(1), negative], dim=1), dim=1)
    if mode == "elimination":
        return (log_denominator - positive).mean()
    attracted = positive + torch.where(found, negative, 0.0).sum(dim=1)
    return (log_denominator - attracted / (1 + found.sum(dim=1))).mean()
