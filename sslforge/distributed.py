"""Collectives that keep the global-batch semantics of a loss.

The defining property of sslforge: N ranks with B/N samples each give the same loss and
gradients as one rank with B samples. The helpers here are what makes that true: a gather whose
backward returns to each rank the gradient of its own samples, and reductions that are no-ops on
a single process so losses stay usable outside a distributed job.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and keeps this rank's slice.

    Each rank's loss uses every rank's samples, so the gradient of a sample is the sum of the
    gradients all ranks computed for it. With DDP averaging parameter gradients afterwards, the
    result equals the single-process gradient of the global mean loss.
    (torch.distributed.nn.all_gather's backward needs reduce_scatter, which gloo lacks.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = tensor.shape[0]
        return torch.cat(_all_gather(tensor), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start:start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) over ranks, rank order, gradients kept."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (eval features)."""
    if not is_distributed():
        return tensor
    counts = _all_gather(torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
    longest = int(max(c.item() for c in counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = _all_gather(padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)], dim=0)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's loss uses the total, so the backward sums gradients too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (global batch statistics)."""
    if not is_distributed():
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (logged metrics, centres); returns a new tensor."""
    return all_reduce_sum(tensor) / world_size()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (counters); returns a new tensor."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is true on at least one: decisions all ranks must share."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
