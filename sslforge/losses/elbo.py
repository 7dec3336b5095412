"""The evidence lower bound of a VAE with a diagonal Gaussian posterior and a N(0, I) prior.

    z = mu + eps * exp(logvar / 2)                          # reparameterisation, eps ~ N(0, I)
    KL(q(z|x) || N(0, I)) = -1/2 sum_d (1 + logvar - mu^2 - exp(logvar))     # per sample
    ELBO(x) = log p(x|z) - KL,   log p(x|z) summed over every pixel and channel
    loss = reduce over the global batch of (beta * KL - log p(x|z))            # sum | mean

Both terms are per-sample sums (pixels, latent dimensions) reduced over the batch the same way,
once: the form of pytorch/examples' vae/main.py (BCE summed + KL summed). Averaging the pixels
but summing the latents (a mean-squared error beside a summed KL) silently weights the KL by
the number of pixels and collapses it (REFERENCE.md, section 12).

logvar is clamped to [LOGVAR_MIN, LOGVAR_MAX] wherever exp(logvar) is taken, so an encoder that
diverges gives a large but finite loss, never inf or NaN. KL, likelihoods and the
reparameterisation compute in float32 under bf16 autocast (`float32_loss`).

Distributed: `global_batch_reduce` gives each rank a loss whose mean over ranks (what DeepSpeed's
gradient averaging optimises, and what the trainer logs) is the sum or the mean over the global
batch, so N ranks with B/N samples each take the step of one rank with B. The noise eps of a
sample is keyed by its dataset index (`indexed_normal`), so it does not depend on the split either.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.precision import float32_loss

# As latent-diffusion's DiagonalGaussianDistribution: exp(20) ~ 4.9e8 and exp(-30) ~ 9.4e-14 are
# finite in float32 (and in bf16), with room for the sums over dimensions and samples.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
REDUCTIONS = ("sum", "mean")
_MASK64 = (1 << 64) - 1


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """logvar within [LOGVAR_MIN, LOGVAR_MAX] (gradient zero outside, as torch.clamp)."""
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


@float32_loss
def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + eps * exp(logvar / 2): a sample of N(mu, exp(logvar)) differentiable in mu and
    logvar; eps (same shape) is standard normal noise."""
    if not mu.shape == logvar.shape == eps.shape:
        raise ValueError(f"reparameterise: mu, logvar and eps must have one shape, got "
                         f"{tuple(mu.shape)}, {tuple(logvar.shape)}, {tuple(eps.shape)}")
    return mu + eps * torch.exp(0.5 * clamp_logvar(logvar))


@float32_loss
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B,) KL(N(mu, diag exp(logvar)) || N(0, I)) of each sample, summed over its latent dims."""
    if mu.ndim != 2 or mu.shape != logvar.shape:
        raise ValueError(f"gaussian_kl: mu and logvar must both be (B, d), got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")
    logvar = clamp_logvar(logvar)
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


@float32_loss
def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) sum over pixels of log Bernoulli(x | sigmoid(logits)), x in [0, 1] (intensities as
    soft targets, as pytorch/examples' BCE; not a normalised density of continuous pixels).
    From the logits, so a saturated sigmoid costs a large finite loss, not log(0)."""
    _check_pixels(logits, x)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)


@float32_loss
def gaussian_log_likelihood(mean: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B,) sum over pixels of log N(x | mean, exp(logvar)); logvar broadcasts (a scalar: one
    variance for every pixel)."""
    _check_pixels(mean, x)
    logvar = clamp_logvar(logvar)
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean).pow(2) / logvar.exp()).flatten(1).sum(dim=1)


def _check_pixels(prediction: torch.Tensor, x: torch.Tensor) -> None:
    if prediction.shape != x.shape or x.ndim < 2:
        raise ValueError(f"reconstruction and images must have one (B, ...) shape, got "
                         f"{tuple(prediction.shape)} and {tuple(x.shape)}")


def global_batch_reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """This rank's share of the sum (`sum`) or mean (`mean`) of per-sample `values` over the
    global batch, times the world size: the ranks' losses average to the global value, so
    DeepSpeed's averaged gradient is the one-rank gradient. With `mean` the divisor is the
    global batch (every rank's count, summed: a collective)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    scale = float(distributed.world_size())
    if reduction == "mean":
        scale /= distributed.sum_over_ranks(len(values))
    return values.sum() * scale


def negative_elbo(log_likelihood: torch.Tensor, kl: torch.Tensor, beta: float, reduction: str) -> torch.Tensor:
    """The loss: beta * KL - log p(x|z) of each sample, reduced once over the global batch
    (both terms alike); beta = 1 is the negative ELBO, beta > 1 a beta-VAE."""
    if log_likelihood.shape != kl.shape or kl.ndim != 1:
        raise ValueError(f"negative_elbo: per-sample (B,) terms expected, got {tuple(log_likelihood.shape)} "
                         f"and {tuple(kl.shape)}")
    return global_batch_reduce(beta * kl - log_likelihood, reduction)


def _splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al., 2014): nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mixed_seed(*keys: int) -> int:
    """A 64-bit seed that depends on every key (run seed, step, sample index, ...)."""
    seed = 0
    for key in keys:
        seed = _splitmix64(seed ^ (key & _MASK64))
    return seed


def indexed_normal(index: torch.Tensor, dim: int, *keys: int) -> torch.Tensor:
    """(B, dim) float32 standard normal noise on the CPU, row i drawn from its own generator
    seeded by (keys, index[i]): a sample gets the same noise whichever rank reads it and however
    the batch is split, on every device (move it to the model's). ~5 us per row."""
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(mixed_seed(*keys, int(i))))
            for i in index.tolist()]
    return torch.stack(rows) if rows else torch.zeros(0, dim)


__all__ = ["LOGVAR_MAX", "LOGVAR_MIN", "REDUCTIONS", "bernoulli_log_likelihood", "clamp_logvar",
           "gaussian_kl", "gaussian_log_likelihood", "global_batch_reduce", "indexed_normal", "mixed_seed",
           "negative_elbo", "reparameterise"]
