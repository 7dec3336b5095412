"""Collectives that keep the global-batch semantics of a loss, and the one gateway to them.

The defining property of sslforge: N ranks with B/N samples each give the same loss and
gradients as one rank with B samples. The helpers here are what makes that true: a gather whose
backward returns to each rank the gradient of its own samples, and reductions that are no-ops on
a single process so losses stay usable outside a distributed job.

Every collective sslforge calls goes through this module (a test scans the package for others).
NCCL takes only tensors on the rank's GPU, so each collective checks that its tensors are on the
rank's communication device (registered by `init_distributed`) and fails with a message naming
both devices; the scalar helpers (`any_rank`, `sum_over_ranks`) build their tensors there, so
their callers cannot get the device wrong.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

_comm_device: torch.device | None = None
# Rows gathered per round by `gather_uneven`, over all ranks: bounds the device memory a whole
# evaluation bank would otherwise take (ImageNet x 2048-d features is 10 GB per rank).
GATHER_CHUNK_BYTES = 256 << 20


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def set_comm_device(device: torch.device | None) -> torch.device | None:
    """Register the device this rank's collectives take tensors on (`init_distributed` does);
    None returns to the backend's default. Returns the previous registration."""
    global _comm_device
    previous, _comm_device = _comm_device, None if device is None else torch.device(device)
    return previous


def comm_device() -> torch.device:
    """Where this rank's collective tensors must live: the registered device, else the one the
    backend needs (a process group started outside sslforge: the current GPU for NCCL)."""
    if _comm_device is not None:
        return _comm_device
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_device(collective: str, tensor: torch.Tensor) -> None:
    expected = comm_device()
    if tensor.device != expected:
        raise RuntimeError(
            f"{collective}: tensor on {tensor.device}, but this rank's collectives run on {expected} "
            "(NCCL takes only tensors on the rank's GPU); create it on distributed.comm_device()")


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, collective: str) -> None:
    _check_device(collective, tensor)
    dist.all_reduce(tensor, op=op)


def _all_gather(tensor: torch.Tensor, collective: str) -> list[torch.Tensor]:
    _check_device(collective, tensor)
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
        return torch.cat(_all_gather(tensor, "gather_with_grad"), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        _all_reduce(grad, dist.ReduceOp.SUM, "gather_with_grad (backward)")
        start = dist.get_rank() * ctx.batch
        return grad[start:start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) over ranks, rank order, gradients kept."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) over ranks, rank order, no gradient:
    MoCo's keys for the queue and the negatives, shuffle BN's inputs."""
    if not is_distributed():
        return tensor
    return torch.cat(_all_gather(tensor, "all_gather"), dim=0)


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`src`'s `tensor` on every rank, in place (shuffle BN's permutation)."""
    if is_distributed():
        _check_device("broadcast", tensor)
        dist.broadcast(tensor, src=src)
    return tensor


@torch.no_grad()
def gather_uneven(tensor: torch.Tensor, chunk_bytes: int = GATHER_CHUNK_BYTES) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (eval features, labels).

    The result is on `tensor`'s own device, typically the host (faiss reads numpy). The rows
    travel through the communication device in rounds of at most `chunk_bytes` over all ranks,
    so host tensors work under NCCL and a bank larger than the GPU's free memory still gathers.
    """
    if not is_distributed():
        return tensor
    device = comm_device()
    counts = [int(c) for c in _all_gather(torch.tensor([len(tensor)], device=device), "gather_uneven")]
    row_bytes = max(1, math.prod(tensor.shape[1:]) * tensor.element_size())  # same on every rank
    rows = max(1, chunk_bytes // (row_bytes * len(counts)))
    pieces: list[list[torch.Tensor]] = [[] for _ in counts]
    for start in range(0, max(counts), rows):
        padded = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        local = tensor[start:start + rows]
        padded[: len(local)] = local
        for r, part in enumerate(_all_gather(padded, "gather_uneven")):
            pieces[r].append(part[: max(0, min(rows, counts[r] - start))].to(tensor.device))
    return torch.cat([tensor[:0], *(p for rank_pieces in pieces for p in rank_pieces)])


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's loss uses the total, so the backward sums gradients too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        _all_reduce(out, dist.ReduceOp.SUM, "all_reduce_sum_with_grad")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        _all_reduce(grad, dist.ReduceOp.SUM, "all_reduce_sum_with_grad (backward)")
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
        _all_reduce(out, dist.ReduceOp.SUM, "all_reduce_sum")
    return out


@torch.no_grad()
def sum_over_ranks(value: float) -> float:
    """Sum of a Python number over ranks (counters, a result only rank 0 computed)."""
    if not is_distributed():
        return float(value)
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=comm_device())).item())


@torch.no_grad()
def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one: decisions all ranks must share."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    _all_reduce(value, dist.ReduceOp.MAX, "any_rank")
    return bool(value.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (torch stages the bytes on the
    backend's device: the current GPU, which `init_distributed` sets, under NCCL)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
