"""GlobalBatchNorm on 2 gloo ranks == torch's BatchNorm on the whole (concatenated) batch.

Output, input gradient, weight and bias gradients and the running statistics must agree for
inputs whose mean is 1, 100 and 3000 times their spread (E[x^2] - mean^2 loses a float32
variance to cancellation there; BatchNorm does not), with `momentum` 0.1 and None (torch's
cumulative moving average), over two steps so the running statistics are averaged.
"""
from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn as nn

from sslforge import distributed
from sslforge.models.norm import GlobalBatchNorm, convert_to_global_bn
from tests.dist_harness import run_ranks

SHAPES = {"1d": (16, 5), "2d": (8, 3, 4, 4)}  # (N, C) and (N, C, H, W)
SCALES = (1.0, 100.0, 3000.0)  # mean / std of every channel
MOMENTA = (0.1, None)
CASES = list(itertools.product(SHAPES, SCALES, MOMENTA))
STEPS = 2
# Relative to the largest reference value. float32 resolves a value of mean m to m * 1.2e-7, so
# two correct implementations summing in different orders differ by up to ~1e-7 * m std: measured
# 3e-7, 1.2e-5 and 2.9e-4 at mean/std 1, 100 and 3000 (torch's own BatchNorm is as far from a
# float64 computation). E[x^2] - mean^2 put the output 8.5e-4 off at 100 and 70 to 300 off at 3000
# (NaN where the cancelled variance goes negative).
TOL = {1.0: 1e-5, 100.0: 1e-4, 3000.0: 2e-3}


def _rows(n: int, rank: int) -> slice:
    """Uneven split (3/8, 5/8): the merge must weight each rank's moments by its count."""
    first = 3 * n // 8
    return slice(0, first) if rank == 0 else slice(first, n)


def _batch(shape: tuple[int, ...], scale: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with per-channel means of about `scale` std, and the upstream gradient."""
    g = torch.Generator().manual_seed(100 * step + len(shape))
    channel_mean = scale * (1 + 0.1 * torch.rand(shape[1], generator=g))
    x = channel_mean.view([1, -1] + [1] * (len(shape) - 2)) + torch.randn(shape, generator=g)
    return x, torch.randn(shape, generator=g)


def _make(cls: type[nn.modules.batchnorm._BatchNorm], channels: int, momentum: float | None) -> nn.Module:
    bn = cls(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, channels))
    return bn


def _steps(bn: nn.Module, shape: tuple[int, ...], scale: float, rows: slice) -> dict[str, Any]:
    """Two training steps on `rows` of each batch; outputs, gradients, then running statistics."""
    out: dict[str, Any] = {"out": [], "x_grad": [], "weight_grad": [], "bias_grad": []}
    for step in range(STEPS):
        x_all, upstream = _batch(shape, scale, step)
        x = x_all[rows].clone().requires_grad_()
        y = bn(x)
        (y * upstream[rows]).sum().backward()
        out["out"].append(y.detach())
        out["x_grad"].append(x.grad)
        out["weight_grad"].append(bn.weight.grad.clone())
        out["bias_grad"].append(bn.bias.grad.clone())
        bn.zero_grad()
    out.update(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
               num_batches_tracked=int(bn.num_batches_tracked))
    return out


def _global_bn_cases() -> dict[tuple, dict[str, Any]]:
    rank = distributed.rank()
    return {(kind, scale, momentum): _steps(_make(GlobalBatchNorm, SHAPES[kind][1], momentum),
                                            SHAPES[kind], scale, _rows(SHAPES[kind][0], rank))
            for kind, scale, momentum in CASES}


def _reference(kind: str, scale: float, momentum: float | None) -> dict[str, Any]:
    cls = nn.BatchNorm1d if kind == "1d" else nn.BatchNorm2d
    shape = SHAPES[kind]
    return _steps(_make(cls, shape[1], momentum), shape, scale, slice(0, shape[0]))


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[tuple, dict[str, Any]]]:
    return run_ranks(_global_bn_cases, 2)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    scale = expected.abs().max().clamp_min(1.0)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("kind,scale,momentum", CASES)
def test_two_ranks_equal_batchnorm_on_whole_batch(two_ranks, kind: str, scale: float,
                                                  momentum: float | None) -> None:
    ref = _reference(kind, scale, momentum)
    ranks = [r[(kind, scale, momentum)] for r in two_ranks]
    tol = TOL[scale]
    for step in range(STEPS):
        at = f"{kind} mean/std={scale:g} momentum={momentum} step {step}"
        for key in ("out", "x_grad"):  # per sample: the ranks' rows, concatenated
            _close(torch.cat([r[key][step] for r in ranks]), ref[key][step], tol, f"{key} {at}")
        for key in ("weight_grad", "bias_grad"):  # each rank's share of the whole-batch loss
            _close(sum(r[key][step] for r in ranks), ref[key][step], tol, f"{key} {at}")
    for key in ("running_mean", "running_var"):
        for r in ranks:
            _close(r[key], ref[key], tol, f"{key} {kind} mean/std={scale:g} momentum={momentum}")
    assert all(r["num_batches_tracked"] == ref["num_batches_tracked"] == STEPS for r in ranks)


def test_conversion_keeps_frozen_parameters_frozen() -> None:
    """A teacher's batch norm (requires_grad False) must stay out of the optimiser after the
    conversion that multi-rank runs apply; a 2-rank BYOL step once trained it."""
    student, teacher = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    teacher.requires_grad_(False)
    teacher.eval()
    model = convert_to_global_bn(nn.ModuleDict({"student": student, "teacher": teacher}), torch.device("cpu"))
    assert isinstance(model["teacher"], GlobalBatchNorm) and not model["teacher"].training
    assert [p.requires_grad for p in model["teacher"].parameters()] == [False, False]
    assert [p.requires_grad for p in model["student"].parameters()] == [True, True]
    assert model["student"].weight is student.weight  # the same Parameter, as torch's conversion
