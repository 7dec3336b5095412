"""Supervised contrastive loss (Khosla et al., 2020), the published L_out form, distributed-aware.

Every view of every sample is an anchor (the official contrast_mode 'all'); its positives P(i)
are the other views of its own sample and every view of the other samples with its label:

    L_i = -(T / T_base) * 1/|P(i)| * sum_{p in P(i)} log( e^{z_i.z_p/T} / sum_{a != i} e^{z_i.z_a/T} )

averaged over anchors. T / T_base is the official rescaling (SupContrast `losses.py`,
base_temperature 0.07; README recipe T = 0.1, so the loss is 0.1 / 0.07 times the plain mean).
An anchor without positive (possible only with one view) gets L_i = 0 and still counts in the
mean, as the official guard (divide by 1 instead of |P(i)| = 0).

Distributed: the official code runs under DataParallel only. Here this rank's b * V anchors meet
the contrast set of all ranks' samples, gathered with gradient, and labels gathered from all
ranks, so a positive on another rank counts; the mean over this rank's anchors averages over
ranks to the loss of the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.precision import float32_loss


def _check(features: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float) -> None:
    if features.ndim != 3:
        raise ValueError(f"supcon_loss: features must be (batch, views, dim), got {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"supcon_loss: labels must be ({features.shape[0]},) for features "
                         f"{tuple(features.shape)}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"supcon_loss: labels must be integer class ids, got {labels.dtype}")
    if temperature <= 0 or base_temperature <= 0:
        raise ValueError(f"supcon_loss: temperature and base_temperature must be > 0, "
                         f"got {temperature} and {base_temperature}")


def _global_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels of every rank's samples, rank order, no gradient."""
    return distributed.all_gather(labels.to(distributed.comm_device())).to(labels.device)


@float32_loss
def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Mean SupCon L_out over this rank's b * V anchors, contrast set and labels of all ranks.

    features: (b, V, d) projections of V views of b samples (normalised here); labels: (b,) ints.
    """
    _check(features, labels, temperature, base_temperature)
    b, views = features.shape[:2]
    labels = labels.to(features.device)
    anchors = F.normalize(features, dim=2).flatten(0, 1)  # (b*V, d), sample-major
    contrast = distributed.gather_with_grad(anchors)  # (B*V, d), rank then sample then view
    logits = anchors @ contrast.T / temperature

    rows = torch.arange(b * views, device=features.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, rows + distributed.rank() * b * views] = True
    log_prob = logits - torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)

    anchor_labels = labels.repeat_interleave(views)
    contrast_labels = _global_labels(labels).repeat_interleave(views)
    positive = (anchor_labels[:, None] == contrast_labels[None, :]) & ~is_self
    mean_log_prob = (log_prob * positive).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob.mean()
