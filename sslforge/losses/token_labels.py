"""Supervised cross-entropies with soft targets and STL's token labels.

    y      = smooth(one_hot(label))  mixed like the images     # (B, K)
    loss   = CE(cls_logits, y)                                  # the class token
           + CE(mean_tokens(token_logits), y)                   # stage 1, the labeler
           or CE(token_logits, token_labels) per token, mean    # stage 2, the student

Token labels come from the frozen labeler's token logits on the clean view: Gumbel-max
samples (STL's `gumbel_softmax(tau=1, hard=True)`, whose forward value is the one-hot of
argmax(logits + Gumbel noise)), or the argmax, or the softmax; one-hot labels are then smoothed,
(1 - a) y + a / K. The Gumbel noise of a sample is drawn from a generator keyed by
(seed, step, sample index), so a sample gets the same labels however the batch is split over
ranks. Every cross-entropy is a mean over this rank's rows: with equal per-rank batches the
mean over ranks that gradient averaging takes is the global batch's mean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sslforge.losses.precision import float32_loss

TOKEN_LABELS = ("gumbel", "argmax", "softmax")


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, K) targets: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) (method.num_classes), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return label_smoothing(F.one_hot(labels, num_classes).float(), smoothing)


def label_smoothing(y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(1 - a) y + a / K over the last dimension (STL's `token_label_smoothing`)."""
    return y * (1.0 - smoothing) + smoothing / y.shape[-1]


@float32_loss
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k t_k log softmax(z)_k; any leading shape, classes last."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def gumbel_uniforms(shape: tuple[int, ...], index: torch.Tensor, seed: int, step: int,
                    device: torch.device) -> torch.Tensor:
    """U(0, 1) of shape (B, *shape): row i from a generator keyed by (seed, step, index[i]), so a
    sample's draws do not depend on which rank holds it or where in the batch it sits."""
    def generator(i: int) -> torch.Generator:
        key = np.random.SeedSequence([seed, step, i]).generate_state(1, np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(key) >> 1)

    rows = [torch.rand(shape, generator=generator(i), device=device) for i in index.tolist()]
    return torch.stack(rows) if rows else torch.zeros(0, *shape, device=device)


@torch.no_grad()
def token_labels(logits: torch.Tensor, mode: str, smoothing: float,
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token targets from a labeler's token logits (..., K), float32. gumbel: one-hot of
    argmax(logits + g), g = -log(-log u) from `uniforms` (same shape); argmax: one-hot of the
    argmax; both then smoothed. softmax: the labeler's probabilities, as STL's
    `--softmax-token-label`, unsmoothed."""
    logits = logits.float()
    if mode == "softmax":
        return logits.softmax(-1)
    if mode == "gumbel":
        if uniforms is None or uniforms.shape != logits.shape:
            raise ValueError("gumbel token labels need uniforms of the logits' shape")
        tiny = torch.finfo(torch.float32).tiny
        logits = logits - torch.log(-torch.log(uniforms.float().clamp(tiny, 1.0 - 1e-7)))
    elif mode != "argmax":
        raise ValueError(f"unknown token label mode '{mode}'; expected one of {TOKEN_LABELS}")
    hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return label_smoothing(hard, smoothing)


__all__ = ["TOKEN_LABELS", "gumbel_uniforms", "label_smoothing", "smooth_one_hot", "soft_cross_entropy",
           "token_labels"]
