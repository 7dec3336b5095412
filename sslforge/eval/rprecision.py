"""R-precision: does an image retrieve its own caption? (AttnGAN, Xu et al. 2018; XMC-GAN.)

For each image (generated from caption i, or a real one), its caption and R - 1 = 99 mismatched
captions drawn from the evaluated set are scored by the cosine similarity of a dual encoder's
image and sentence embeddings; the image counts as a hit when its own caption scores highest.
R-precision is the mean hit rate (R = 1: top-1 among 100), chance 1%. The protocol is DM-GAN's
implementation of AttnGAN's (MinfengZhu/DM-GAN code/trainer.py `sampling`, datasets.py
`get_mis_caption`): mismatched captions come from other samples, never from the image's own
class (CUB: its species; COCO, whose class ids are image ids: its other captions). Here:
- a candidate is mismatched when its token ids differ from the image's caption (built-in
  captions repeat: an identical caption is not a wrong one), and the 99 are distinct samples
  (DM-GAN draws with replacement);
- the draws are keyed by (seed, sample index), so they do not depend on the ranks, the batch
  size or the order of evaluation;
- a tie with the best mismatched score counts as 1 / (1 + tied candidates), the expected hit of
  a random tie-break (argmax would give every tie to the own caption);
- DM-GAN reports the mean and std over 10 folds of 3000 of 30000 images; this is the mean.

Distributed: each rank embeds its share of the images and captions; every rank then holds every
caption embedding (gathered, in index order), scores its own images, and hits are summed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge import distributed
from sslforge.eval import EvalError

CANDIDATES = 100  # R-1 = 99 mismatched captions and the own one


@contextmanager
def scoring(scorer: nn.Module) -> Iterator[nn.Module]:
    """The scorer in eval mode with rank 0's buffers (each image scored by the same network
    whichever rank holds it); its mode is restored after."""
    from sslforge.eval.features import with_rank0_buffers

    model = with_rank0_buffers(scorer)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def scorer_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """[0, 1] images at the scorer's resolution, normalised as its training crops were."""
    from sslforge.data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD

    images = images.float()
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def caption_classes(text_ids: torch.Tensor) -> np.ndarray:
    """One id per distinct caption (identical token ids, identical id)."""
    return np.unique(text_ids.cpu().numpy(), axis=0, return_inverse=True)[1].reshape(-1)


def mismatched_candidates(sample_index: int, own: int, classes: np.ndarray, seed: int,
                          count: int = CANDIDATES - 1) -> np.ndarray:
    """`count` distinct positions of the caption set whose caption differs from position `own`'s,
    drawn by a generator keyed by (seed, sample_index) alone."""
    eligible = len(classes) - int((classes == classes[own]).sum())
    if eligible < count:
        raise EvalError(f"R-precision needs {count} captions unlike each image's own; the evaluated set has "
                        f"{eligible} for sample {sample_index} ({len(classes)} samples)")
    rng = np.random.default_rng([seed, sample_index])
    picked: dict[int, None] = {}
    while len(picked) < count:
        draw = rng.integers(0, len(classes), size=2 * count)
        for position in draw[classes[draw] != classes[own]].tolist():
            picked.setdefault(position, None)
    return np.fromiter(picked, dtype=np.int64, count=len(picked))[:count]


def hits(image: torch.Tensor, own: torch.Tensor, candidates: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(b,) hit of each image: 1 when its own caption's cosine beats every candidate's, 1/(1+k)
    when it ties with k of them. image (b, d), bank (N, d): L2-normalised; own (b,) and
    candidates (b, R-1): positions in the bank."""
    own_score = (image * bank[own]).sum(1)
    other = torch.einsum("bd,bkd->bk", image, bank[candidates])
    best = other.max(1).values
    ties = (other == own_score[:, None]).sum(1)
    return torch.where(own_score > best, 1.0, torch.where(own_score == best, 1.0 / (1.0 + ties), 0.0))


class RPrecision:
    """R-precision accumulated over batches on this rank; `compute` is collective.

    The scorer is a dual encoder (`methods.dual_encoder.DualEncoder`, or anything with its
    `image_embedding(normalised images)`, `text_embedding(text_ids, text_mask)` and
    `cfg.data`), as `scoring(scorer)` yields it. Captions are tokenised as the scorer was trained
    (`scorer.cfg.data.tokenizer`), whatever tokenizer the scored generator reads."""

    def __init__(self, scorer: nn.Module, seed: int = 0) -> None:
        from sslforge.data_pipeline.captions import build_tokenizer

        self.scorer, self.seed = scorer, seed
        data = scorer.cfg.data  # type: ignore[union-attr]
        self.image_size = int(data.image_size)
        self.tokenizer = build_tokenizer(data.tokenizer, data.max_tokens)
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor, captions: list[str], index: torch.Tensor) -> None:
        """Images in [0, 1] (generated from, or paired with, these captions) and the captions'
        global sample indices."""
        device = next(self.scorer.parameters()).device
        text_ids, text_mask = self.tokenizer(captions)
        image = self.scorer.image_embedding(scorer_input(images.to(device), self.image_size))
        text = self.scorer.text_embedding(text_ids.to(device), text_mask.to(device))
        self.images.append(F.normalize(image.float(), dim=1).cpu())
        self.texts.append(F.normalize(text.float(), dim=1).cpu())
        self.ids.append(text_ids)
        self.index.append(index.cpu())

    def compute(self) -> float:
        """Hit rate over every rank's images (collective)."""
        dim = self._dim()
        local_index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long)
        local_ids = torch.cat(self.ids) if self.ids else torch.zeros(0, self.tokenizer.max_tokens, dtype=torch.long)
        local_text = torch.cat(self.texts) if self.texts else torch.zeros(0, dim)
        index, ids, bank = (distributed.gather_uneven(t) for t in (local_index, local_ids, local_text))
        order = torch.argsort(index)
        index, ids, bank = index[order], ids[order], bank[order]
        total = distributed.sum_over_ranks(float(len(local_index)))
        if total == 0:
            raise EvalError("R-precision: no samples to score")
        classes = caption_classes(ids)
        eligible = len(classes) - int(np.bincount(classes).max())
        if eligible < CANDIDATES - 1:  # on every rank alike: the set is the same everywhere
            raise EvalError(f"R-precision needs {CANDIDATES - 1} captions unlike each image's own; "
                            f"{len(classes)} samples leave only {eligible} for the most repeated caption")
        own = torch.searchsorted(index, local_index)
        candidates = torch.zeros(0, CANDIDATES - 1, dtype=torch.long)
        if len(own):
            candidates = torch.from_numpy(np.stack([mismatched_candidates(int(i), int(p), classes, self.seed)
                                                    for i, p in zip(local_index, own)]))
        image = torch.cat(self.images) if self.images else torch.zeros(0, dim)
        return distributed.sum_over_ranks(float(hits(image, own, candidates, bank).sum())) / total

    def _dim(self) -> int:
        """The embedding width, on every rank (one that scored nothing still joins the gathers)."""
        return max(distributed.all_gather_object(self.texts[0].shape[1] if self.texts else -1))
