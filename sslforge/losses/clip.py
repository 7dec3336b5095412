"""CLIP's symmetric image-text contrastive loss, distributed-aware (Radford et al., 2021).

    logits = scale * norm(image) @ norm(text).T      # (b, B): local rows, global columns
    loss = (CE(logits, own) + CE(logits_text_to_image, own)) / 2

Each rank scores its b images against the B captions of all ranks and its b captions against
the B images, with the positive of local row i at column `rank * b + i`: OpenCLIP's
`local_loss=True, gather_with_grad=True`. The gather keeps gradients, so the mean over ranks
of this rank's loss (what DeepSpeed's gradient averaging optimises) is the loss of the global
batch, and its gradients are the single-process ones. `scale` is 1/temperature: a learnable
`logit_scale.exp()` (CLIP) or a constant (XMC-GAN's sentence-image loss, 1/0.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.precision import float32_loss


@float32_loss
def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
              gather: bool = True) -> torch.Tensor:
    """Mean of the image-to-text and text-to-image cross-entropies over this rank's b pairs.

    image, text: (b, d) embeddings of matching pairs (normalised here); scale: the logit
    multiplier (a tensor keeps its gradient); gather: negatives from every rank, else this
    rank's batch only.
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"clip_loss: image and text must both be (b, d), got {tuple(image.shape)} "
                         f"and {tuple(text.shape)}")
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    all_image = distributed.gather_with_grad(image) if gather else image
    all_text = distributed.gather_with_grad(text) if gather else text
    own = torch.arange(len(image), device=image.device) + (distributed.rank() * len(image) if gather else 0)
    image_to_text = scale * image @ all_text.T
    text_to_image = scale * text @ all_image.T
    return (F.cross_entropy(image_to_text, own) + F.cross_entropy(text_to_image, own)) / 2


__all__ = ["clip_loss"]
