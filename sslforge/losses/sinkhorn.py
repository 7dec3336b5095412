"""SwAV's codes by Sinkhorn-Knopp over the global batch, and its swapped-prediction loss.

    Q = exp(S / eps)^T                       # K x B: prototypes x every rank's samples
    repeat n times:
        Q /= K * (sum of each row)           # every prototype holds 1/K of the mass (all ranks)
        Q /= B * (sum of each column)        # every sample holds 1/B (a column is one sample)
    codes = B * Q^T                          # one row per sample, summing to 1

`distributed_sinkhorn` in facebookresearch/swav. Each rank holds its own rows; the columns are
local, and only the per-prototype sums cross ranks, so N ranks give the codes of one process
holding all rows. B counts every rank's rows, queue rows included, as the paper's; a queue
enters as extra rows of `scores`, and the codes of the current batch are the last ones. (B and
K only scale the intermediate matrix: each normalisation removes the previous one's constant.)

Two departures from the official transcription, neither changing the result:
- It works on log Q. exp(S / eps) overflows float32 once a score passes 88 * eps (4.4 at eps
  0.05: scores of features that are not unit-norm, swav#67), and a prototype that no sample
  likes underflows to a zero row, then 0/0. In the log domain every normalisation is a
  log-sum-exp, finite for any finite input. A sum of exponentials has no stable all_reduce (the
  shift must be the largest term of every rank), so each rank's per-prototype log-sums are
  gathered (K numbers per rank) and combined by one more log-sum-exp.
- The official first divides Q by its total (one more all_reduce); the row normalisation that
  follows removes any common factor, so it is left out.
Always float32, whatever the input (bf16 scores under autocast): the exponent is scores / 0.05.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.crop_pairs import cross_entropy_over_crop_pairs
from sslforge.losses.precision import float32_loss


def _check_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> None:
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"sinkhorn: scores must be (samples, prototypes), got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn: need epsilon > 0 and iterations >= 1, got {epsilon} and {iterations}")


def _logsumexp_over_ranks(local: torch.Tensor) -> torch.Tensor:
    """log sum exp over every rank of this rank's (K,) log-sums: each rank's are gathered."""
    gathered = distributed.all_gather(local[None].to(distributed.comm_device()))
    return torch.logsumexp(gathered, dim=0).to(local.device)


@float32_loss
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes (b, K) of this rank's rows `scores` (b, K), balanced over every rank's rows.

    Each row sums to 1; over all ranks each prototype receives about B/K of the mass (exactly
    before the last column normalisation). No gradient.
    """
    _check_sinkhorn(scores, epsilon, iterations)
    log_q = scores / epsilon  # rows: samples, columns: prototypes (the paper's Q transposed)
    log_prototypes = math.log(scores.shape[1])
    log_samples = math.log(len(scores) * distributed.world_size())
    for _ in range(iterations):
        log_q = log_q - _logsumexp_over_ranks(torch.logsumexp(log_q, dim=0)) - log_prototypes
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_samples
    return torch.exp(log_q + log_samples)


def _check_swav(scores: list[torch.Tensor], codes: list[torch.Tensor]) -> None:
    if not codes or len(scores) <= len(codes):
        raise ValueError(f"swav_loss: need at least one coded crop and more crops than coded ones "
                         f"(coded first), got {len(codes)} coded and {len(scores)} crops")
    shape = scores[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in (*scores, *codes)):
        raise ValueError(f"swav_loss: every crop's scores and codes must be the same (b, K), got "
                         f"{[tuple(t.shape) for t in (*scores, *codes)]}")


@float32_loss
def swav_loss(scores_per_crop: list[torch.Tensor], codes_per_global_crop: list[torch.Tensor],
              temperature: float) -> torch.Tensor:
    """Swapped prediction: every crop v predicts the code of every coded crop i != v.

    scores_per_crop: (b, K) prototype scores of each crop, the coded (global) crops first;
    codes_per_global_crop: their codes (b, K), targets only.
    L = mean over i of mean over v != i of mean_b -sum_k q_i log softmax(p_v / T).
    """
    _check_swav(scores_per_crop, codes_per_global_crop)
    codes = torch.stack([q.detach() for q in codes_per_global_crop])
    log_probs = torch.stack([F.log_softmax(p / temperature, dim=-1) for p in scores_per_crop])
    return cross_entropy_over_crop_pairs(codes, log_probs)
