"""DINO's self-distillation loss and its centre, distributed-aware.

    q_t = softmax((t_t - c) / tau_t)                      # teacher, global crops only, sg
    L   = mean over pairs (t, v), v != t, of  mean_b  sum_k -q_t log softmax(s_v / tau_s)
    c  <- m c + (1 - m) mean over all ranks' teacher rows

The teacher's crops are the student's first crops (the globals), so a crop is never its own
target. The loss is a mean over samples, so the mean of the ranks' losses is the global loss and
needs no collective; the centre does need one: a sum over ranks of each rank's row sums, as
`DINOLoss.update_center` in facebookresearch/dino. Both run in float32 under any autocast: a
teacher temperature of 0.04 multiplies logits by 25 before the exponent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.losses.crop_pairs import cross_entropy_over_crop_pairs
from sslforge.losses.precision import float32_loss


def _check_crops(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor],
                 center: torch.Tensor) -> None:
    if not teacher_out or len(student_out) < len(teacher_out):
        raise ValueError(f"dino_loss: need at least one teacher crop and as many student crops "
                         f"(teacher first), got {len(teacher_out)} teacher and {len(student_out)} student")
    shape = teacher_out[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in (*student_out, *teacher_out)):
        raise ValueError(f"dino_loss: every crop's logits must be the same (b, K), got "
                         f"{[tuple(t.shape) for t in (*student_out, *teacher_out)]}")
    if center.shape[-1] != shape[1] or center.numel() != shape[1]:
        raise ValueError(f"dino_loss: center must be (1, {shape[1]}), got {tuple(center.shape)}")


@float32_loss
def dino_loss(student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy of every student crop against every other crop's sharpened, centred teacher.

    student_out: per-crop logits (b, K), globals first; teacher_out: the globals' logits (b, K);
    center: (1, K). Averaged over the len(teacher) * (len(student) - 1) pairs.
    """
    _check_crops(student_out, teacher_out, center)
    targets = torch.stack([F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out])
    log_probs = torch.stack([F.log_softmax(s / student_temp, dim=-1) for s in student_out])
    return cross_entropy_over_crop_pairs(targets, log_probs)


@float32_loss
@torch.no_grad()
def dino_center(teacher_out: list[torch.Tensor], center: torch.Tensor, momentum: float) -> torch.Tensor:
    """The next centre (1, K): an EMA towards the mean teacher logit over all crops and ranks.

    Every rank holds the same number of rows, as in DINO, so the mean is the summed row sums over
    rows_local * world_size.
    """
    rows = torch.cat(teacher_out)  # (n_crops * b, K)
    if center.numel() != rows.shape[1]:
        raise ValueError(f"dino_center: center must be (1, {rows.shape[1]}), got {tuple(center.shape)}")
    total = distributed.all_reduce_sum(rows.sum(dim=0, keepdim=True).to(distributed.comm_device()))
    batch_center = total.to(center.device) / (len(rows) * distributed.world_size())
    return center.reshape(1, -1) * momentum + batch_center * (1 - momentum)
