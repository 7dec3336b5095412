"""Variational autoencoder (Kingma & Welling, 2014) with convolutional networks.

    x = unit_pixels(crop)                        # [0, 1]: the views' normalisation undone
    mu, logvar = encoder(x)
    z = mu + eps * exp(logvar / 2)               # eps ~ N(0, I), drawn per sample index and step
    log p(x|z) = sum over pixels of log Bernoulli(x | sigmoid(decoder(z)))          # bernoulli
               | sum over pixels of log N(x | sigmoid(decoder(z)), sigma^2)         # gaussian
    KL = sum over latent dims of KL(N(mu, exp(logvar)) || N(0, I))
    loss = reduce over the global batch of (beta * KL - log p(x|z))    # method.reduction: sum | mean

`method.likelihood=gaussian` has one variance for every pixel: learned (a parameter, the
calibrated decoder of Rybkin et al., 2021) or fixed at exp(`gaussian_logvar`)
(`gaussian_variance`). The view is the whole image, flipped, with no colour or blur: the model
learns the images themselves. Evaluation: the per-sample ELBO on `data.val` (each image once
over all ranks, the same noise per image at every evaluation), bits per dimension, and two image
grids (reconstructions under their originals, decoded samples of the prior from a fixed seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import MethodConfig, ViewConfig
from sslforge.eval.features import with_rank0_buffers
from sslforge.losses.elbo import (REDUCTIONS, bernoulli_log_likelihood, gaussian_kl, gaussian_log_likelihood,
                                  indexed_normal, negative_elbo, reparameterise)
from sslforge.methods.base import EvalContext, Method
from sslforge.data_pipeline.views import unit_pixels
from sslforge.models.conv_vae import ConvDecoder, ConvEncoder, PosteriorMean, feature_side

LIKELIHOODS = ("bernoulli", "gaussian")
GRID_WIDTH = 8  # images per row of the grids
EVAL_NOISE_KEY = -1  # in place of the step: the evaluation's noise is the same at every evaluation


@dataclass
class VAEConfig(MethodConfig):
    name: str = "vae"
    latent_dim: int = 128
    hidden_dims: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one stride-2 level each
    likelihood: str = "bernoulli"  # bernoulli | gaussian
    gaussian_variance: str = "learned"  # gaussian: learned | fixed (one variance for every pixel)
    gaussian_logvar: float = 0.0  # gaussian: log sigma^2, fixed or the learned one's start
    reduction: str = "sum"  # sum | mean over the global batch, for both terms
    beta: float = 1.0  # weight of the KL (1: the ELBO; > 1: beta-VAE)
    grid_images: int = 32  # images in each evaluation grid
    sample_seed: int = 0  # seed of the prior samples drawn in every sample grid


class ElboTerms(NamedTuple):
    """Per-sample (B,) terms of one forward, and the posterior means."""

    log_likelihood: torch.Tensor
    kl: torch.Tensor
    mu: torch.Tensor


class VAE(Method):
    config_class = VAEConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        m, size = cfg.method, cfg.data.image_size
        self.encoder_net = ConvEncoder(size, m.hidden_dims, m.latent_dim)
        self.decoder = ConvDecoder(size, m.hidden_dims, m.latent_dim)
        logvar = torch.full((1,), float(m.gaussian_logvar))
        if m.likelihood == "gaussian" and m.gaussian_variance == "learned":
            self.decoder_logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("decoder_logvar", logvar)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        m = cfg.method
        for key, value, allowed in (("likelihood", m.likelihood, LIKELIHOODS), ("reduction", m.reduction, REDUCTIONS),
                                    ("gaussian_variance", m.gaussian_variance, ("learned", "fixed"))):
            if value not in allowed:
                raise ValueError(f"method.{key}={value!r} is not one of {', '.join(allowed)}")
        if m.beta < 0:
            raise ValueError(f"method.beta must be >= 0, got {m.beta}")
        if m.latent_dim < 1 or m.grid_images < 1 or any(h < 1 for h in m.hidden_dims):
            raise ValueError("method.latent_dim, method.grid_images and every method.hidden_dims entry must be >= 1")
        feature_side(cfg.data.image_size, m.hidden_dims)
        crops = sum(v.count for v in (list(cfg.data.views) or cls.views(cfg)))
        if crops != 1:
            raise ValueError(f"the VAE takes one crop per image, the counts of data.views give {crops}")

    @classmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The whole image (RandomResizedCrop at scale 1: a square image as it is, another one's
        aspect ratio squashed within 3/4..4/3), a horizontal flip, nothing photometric."""
        return [ViewConfig(size=cfg.data.image_size, scale=[1.0, 1.0], flip_p=0.5, jitter_p=0.0,
                           grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)]

    # ------------------------------------------------------------------ training
    def elbo_terms(self, x: torch.Tensor, eps: torch.Tensor) -> ElboTerms:
        """Encode [0, 1] images, sample z with the noise `eps`, decode, score."""
        mu, logvar = self.encoder_net(x)
        logits = self.decoder(reparameterise(mu, logvar, eps.to(mu.device)))
        if self.cfg.method.likelihood == "bernoulli":
            log_likelihood = bernoulli_log_likelihood(logits, x)
        else:
            log_likelihood = gaussian_log_likelihood(torch.sigmoid(logits.float()), x, self.decoder_logvar)
        return ElboTerms(log_likelihood, gaussian_kl(mu, logvar), mu)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x = unit_pixels(batch["views"][0])
        eps = indexed_normal(batch["index"], self.cfg.method.latent_dim, self.cfg.train.seed, step)
        terms = self.elbo_terms(x, eps)
        m = self.cfg.method
        loss = negative_elbo(terms.log_likelihood, terms.kl, m.beta, m.reduction)
        return {"loss": loss, "elbo": (terms.log_likelihood - terms.kl).mean().detach(),
                "kl": terms.kl.mean().detach(), "recon_nll": -terms.log_likelihood.mean().detach(),
                "embedding": terms.mu.detach()}

    def encoder(self) -> nn.Module:
        """Normalised images -> mu (kNN and export)."""
        return PosteriorMean(self.encoder_net)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, context: EvalContext) -> dict[str, float]:
        """Mean per-sample ELBO over `data.val` (nats; one z per image), bits per dimension, and
        the two grids, written and logged by rank 0. Collective. Batch norm from running
        statistics, rank 0's on every rank (per-rank BN without `model.sync_bn` differs)."""
        vae = with_rank0_buffers(self)
        was_training = vae.training
        vae.eval()
        try:
            total, count, originals = vae._val_elbo(context)
            if context.env.is_main:
                vae._write_grids(context, originals)
        finally:
            vae.train(was_training)
        elbo = total / max(count, 1)
        # -ELBO / (D ln 2): the continuous bound on [0, 1]-scaled pixels, not the discrete 8-bit one
        # (which needs uniform dequantisation and adds log2(256) = 8 bits per dimension). For the
        # Bernoulli likelihood it is the cross-entropy of the intensities, comparable only with
        # other Bernoulli runs.
        dims = 3 * self.cfg.data.image_size ** 2
        return {"val_elbo": elbo, "val_bpd": -elbo / (dims * math.log(2))}

    def _val_elbo(self, context: EvalContext) -> tuple[float, int, torch.Tensor]:
        """(sum of the per-sample ELBOs over every rank, their number, this rank's first
        `grid_images` images in [0, 1])."""
        from sslforge.data_pipeline.eval_stream import eval_batches
        from sslforge.data_pipeline.shards import expand_shards
        from sslforge.eval.classify import split_eval_transform

        cfg, env = self.cfg, context.env
        to_unit, _ = split_eval_transform(cfg.data.image_size)  # resize + centre crop, not normalised
        sums = torch.zeros(2, dtype=torch.float64)
        kept: list[torch.Tensor] = []
        for batch in eval_batches(expand_shards(cfg.data.val), to_unit, cfg.eval.batch_size, env.rank,
                                  env.world_size, cfg.data.num_workers):
            x = batch["image"].to(env.device)
            eps = indexed_normal(batch["index"], cfg.method.latent_dim, cfg.train.seed, EVAL_NOISE_KEY)
            terms = self.elbo_terms(x, eps)
            sums += torch.tensor([float((terms.log_likelihood - terms.kl).double().sum()), len(x)],
                                 dtype=torch.float64)
            wanted = cfg.method.grid_images - sum(map(len, kept))
            if wanted > 0:  # a copy: a view would keep every batch's storage alive
                kept.append(batch["image"][:wanted].clone())
        sums = distributed.all_reduce_sum(sums.to(distributed.comm_device())).cpu()
        size = cfg.data.image_size
        return float(sums[0]), int(sums[1]), torch.cat([torch.zeros(0, 3, size, size), *kept])

    def _write_grids(self, context: EvalContext, originals: torch.Tensor) -> None:
        """Reconstructions (the mean of p(x|z=mu)), each row under its row of originals, and
        decoded prior samples z ~ N(0, I) from `sample_seed`, into images_dir, logged."""
        from sslforge.eval.image_grid import save_image_grid

        m, device, step = self.cfg.method, context.env.device, f"{context.step:08d}"
        if len(originals):
            reconstructions = torch.sigmoid(self.decoder(self.encoder_net(originals.to(device))[0]).float()).cpu()
            width = min(GRID_WIDTH, len(originals))
            rows = [torch.cat(pair) for pair in zip(originals.split(width), reconstructions.split(width))]
            path = save_image_grid(torch.cat(rows), context.images_dir / f"reconstructions_{step}.png", nrow=width)
            context.log_image("val_reconstructions", path)
        z = torch.randn(m.grid_images, m.latent_dim, generator=torch.Generator().manual_seed(m.sample_seed))
        samples = torch.sigmoid(self.decoder(z.to(device)).float()).cpu()
        path = save_image_grid(samples, context.images_dir / f"samples_{step}.png", nrow=min(GRID_WIDTH, m.grid_images))
        context.log_image("prior_samples", path)
