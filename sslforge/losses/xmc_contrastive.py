"""XMC-GAN's losses (Zhang et al., 2021), distributed-aware: three contrastive terms and the hinge.

    pair loss   (sentence-image, real-fake image):
        a, b = norm(a), norm(b);  L = CE(a b^T / tau, own) + CE(b a^T / tau, own)      tau = 0.1
    word-region loss (AttnGAN's DAMSM matching, masked words):
        c_l   = sum_r softmax_r(g1 cos(region_r, word_l)) norm(region_r)               g1 = 5
        S     = g3 / g2 * log sum_{valid l} exp(g2 cos(word_l, c_l))                    g2 = 5, g3 = 50
        L     = CE(S over sentences, own) + CE(S over images, own)
    hinge:  D = mean relu(1 - real) + mean relu(1 + fake);  G = -mean fake

The official code (google-research/xmcgan_image_generation, libml/attention_lib.py) adds the two
directions of each contrastive loss (no factor 1/2) and takes negatives from the local batch
only (`sync_match` is not implemented there). Here `gather=True` takes them from every rank:
each rank scores its b rows against the B columns of all ranks, the positive of local row i at
column `rank * b + i`, through `gather_with_grad`; the mean over ranks of this rank's loss (what
gradient averaging optimises) is then the loss of the global batch, and its gradients the
single-process ones. `gather=False` is the official local-batch loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.clip import clip_loss
from sslforge.losses.precision import float32_loss

MASKED = -1e9  # the official additive mask: finite, so a caption with no valid word stays finite
EPS = 1e-6  # on the norm: the official l2_normalize's 1e-12 on the squared norm


@float32_loss
def pair_contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1,
                          gather: bool = True) -> torch.Tensor:
    """The official `contrastive_loss`: the a-to-b plus the b-to-a cross-entropy of matching
    rows (b, d) at `temperature` (CLIP's symmetric loss, summed rather than averaged).
    Sentence-image: (image feature, projected sentence); image-image: (fake, real)."""
    if temperature <= 0:
        raise ValueError(f"pair_contrastive_loss: temperature must be > 0, got {temperature}")
    return 2.0 * clip_loss(a, b, 1.0 / temperature, gather=gather)


def word_region_scores(words: torch.Tensor, word_mask: torch.Tensor, regions: torch.Tensor,
                       gamma1: float = 5.0, gamma2: float = 5.0, gamma3: float = 50.0) -> torch.Tensor:
    """(S, I) matching scores of S captions against I images.

    words (S, L, d) with word_mask (S, L) bool (True: a valid token); regions (I, R, d). Each
    word attends over an image's normalised regions (softmax over the regions of g1 times their
    cosine), and the caption's score is the g2 log-sum-exp of its valid words' cosines with
    their attended contexts, scaled by g3 / g2 (the official `word_loss`)."""
    if words.ndim != 3 or regions.ndim != 3 or words.shape[2] != regions.shape[2]:
        raise ValueError(f"word_region_scores: words (S, L, d) and regions (I, R, d) expected, got "
                         f"{tuple(words.shape)} and {tuple(regions.shape)}")
    if word_mask.shape != words.shape[:2]:
        raise ValueError(f"word_region_scores: word_mask must be {tuple(words.shape[:2])}, "
                         f"got {tuple(word_mask.shape)}")
    w = F.normalize(words, dim=-1, eps=EPS)
    r = F.normalize(regions, dim=-1, eps=EPS)
    attention = torch.einsum("ird,sld->sirl", r, w).mul(gamma1).softmax(dim=2)  # over regions
    context = torch.einsum("sirl,ird->sild", attention, r)
    cosine = (w[:, None] * F.normalize(context, dim=-1, eps=EPS)).sum(-1)  # (S, I, L)
    logits = (gamma2 * cosine).masked_fill(~word_mask[:, None, :], MASKED)
    return logits.logsumexp(dim=-1) * (gamma3 / gamma2)


@float32_loss
def word_region_loss(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                     gamma1: float = 5.0, gamma2: float = 5.0, gamma3: float = 50.0,
                     gather: bool = True) -> torch.Tensor:
    """Image-to-caption plus caption-to-image cross-entropy of the word-region scores of this
    rank's b matching (regions (b, R, d), words (b, L, d), word_mask (b, L)) pairs.

    With `gather`, a local image is scored against every rank's captions (their words and masks
    gathered) and a local caption against every rank's images (their regions gathered): b x B
    scores each way instead of the B x B table."""
    if not (len(regions) == len(words) == len(word_mask)):
        raise ValueError(f"word_region_loss: regions, words and word_mask must hold the same b pairs, got "
                         f"{len(regions)}, {len(words)} and {len(word_mask)}")
    word_mask = word_mask.bool()
    gammas = (gamma1, gamma2, gamma3)
    if not gather or distributed.world_size() == 1:
        scores = word_region_scores(words, word_mask, regions, *gammas)  # (captions, images)
        own = torch.arange(len(regions), device=regions.device)
        return F.cross_entropy(scores.T, own) + F.cross_entropy(scores, own)
    all_words = distributed.gather_with_grad(words)
    all_masks = distributed.all_gather(word_mask.to(torch.uint8)).bool()
    all_regions = distributed.gather_with_grad(regions)
    own = torch.arange(len(regions), device=regions.device) + distributed.rank() * len(regions)
    image_to_text = word_region_scores(all_words, all_masks, regions, *gammas).T  # (b, B)
    text_to_image = word_region_scores(words, word_mask, all_regions, *gammas)  # (b, B)
    return F.cross_entropy(image_to_text, own) + F.cross_entropy(text_to_image, own)


@float32_loss
def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: mean relu(1 - real) + mean relu(1 + fake)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


@float32_loss
def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's hinge loss: -mean fake."""
    return -fake_logits.mean()


__all__ = ["hinge_d_loss", "hinge_g_loss", "pair_contrastive_loss", "word_region_loss", "word_region_scores"]
