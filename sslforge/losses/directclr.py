"""DirectCLR (Jing et al., 2022): InfoNCE on the first d0 dimensions of the backbone output.

A trainable projector keeps contrastive learning from collapsing the representation to a few
dimensions; DirectCLR drops the projector and applies InfoNCE to the sub-vector r[:d0] of the
backbone representation r directly (d0 = 360 for ResNet-50's 2048). With z = normalize(r[:d0])
of the two views and the global batch's B images, the published loss (facebookresearch/directclr,
directclr/main.py `infoNCE`, T = 0.1) contrasts each view against the other view only:

    L = 1/2 [ mean_i -log( e^{z1_i.z2_i/T} / sum_j e^{z1_i.z2_j/T} ) + (1 <-> 2) ]

(B - 1 negatives per anchor). `same_view_negatives` gives SimCLR's NT-Xent instead (`nt_xent`,
2B - 2 negatives: the other images' views of both kinds) on the same sub-vectors.

Each rank computes its own b anchors of each direction against every rank's keys, gathered
with gradient, so the mean over ranks (what the trainer's gradient averaging optimises) is the
global loss; the official code computes the whole B x B loss on every rank, with the same
gradient. Its online linear classifier on detached r (the official monitor) is left to
sslforge's evaluation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.contrastive import nt_xent
from sslforge.losses.precision import float32_loss


@float32_loss
def directclr_loss(h1: torch.Tensor, h2: torch.Tensor, dims: int, temperature: float = 0.1,
                   same_view_negatives: bool = False) -> torch.Tensor:
    """DirectCLR's loss over this rank's b images; negatives from all ranks.

    h1, h2: (b, D) backbone representations of the two views (no projector, not normalised);
    dims: d0, how many leading dimensions enter the loss (1 <= d0 <= D); temperature: 0.1
    published. same_view_negatives: NT-Xent instead of the published cross-view InfoNCE.
    """
    if h1.ndim != 2 or h1.shape != h2.shape or len(h1) == 0:
        raise ValueError(f"directclr_loss: h1 and h2 must both be (b, D) with b >= 1, got "
                         f"{tuple(h1.shape)} and {tuple(h2.shape)}")
    if not 1 <= dims <= h1.shape[1]:
        raise ValueError(f"directclr_loss: dims must lie in [1, {h1.shape[1]}] (the representation's "
                         f"size), got {dims}")
    if temperature <= 0:
        raise ValueError(f"directclr_loss: temperature must be > 0, got {temperature}")
    if same_view_negatives:
        return nt_xent(h1[:, :dims], h2[:, :dims], temperature)
    z1, z2 = F.normalize(h1[:, :dims], dim=1), F.normalize(h2[:, :dims], dim=1)
    keys1, keys2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
    targets = torch.arange(len(z1), device=z1.device) + distributed.rank() * len(z1)
    forward = F.cross_entropy(z1 @ keys2.T / temperature, targets)
    backward = F.cross_entropy(z2 @ keys1.T / temperature, targets)
    return (forward + backward) / 2
