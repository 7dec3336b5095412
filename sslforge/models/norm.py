"""Batch norm over the global batch, on every device.

Multi-GPU SSL normalises with SyncBatchNorm so N ranks equal one rank with the whole batch.
torch's SyncBatchNorm refuses CPU tensors, so on CPU (gloo) each rank's statistics are gathered
with a differentiable all-gather and merged instead; on GPU torch's fused implementation is used.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sslforge import distributed


def _merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total count, mean and biased variance of groups given as (groups, C) count, mean, M2.

    The parallel-variance merge (Chan, Golub & LeVeque, 1979): M2 = sum M2_g + n_g (mean_g -
    mean)^2, where M2_g is the sum of squared deviations from the group's own mean. Unlike
    E[x^2] - mean^2 it does not cancel when the mean dwarfs the spread (that form loses every
    digit of a float32 variance at mean/std ~ 3000).
    """
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return n, mean, m2 / n


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2}d whose training statistics are those of the global batch."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"GlobalBatchNorm expects 2D or 4D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.float()
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        n, mean, var = self._global_moments(xf)
        if self.track_running_stats:
            self._update_running_stats(n, mean.detach(), var.detach())
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @staticmethod
    def _global_moments(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Count, mean and biased variance per channel over every rank's batch (differentiable:
        each rank's loss depends on every rank's samples through them)."""
        dims = [0] + list(range(2, xf.dim()))
        mean = xf.mean(dims)
        m2 = (xf - mean.view([1, -1] + [1] * (xf.dim() - 2))).square().sum(dims)
        count = torch.full_like(mean, float(xf.numel() // xf.shape[1]))
        counts, means, m2s = distributed.gather_with_grad(torch.stack([count, mean, m2])[None]).unbind(1)
        return _merge_moments(counts, means, m2s)

    @torch.no_grad()
    def _update_running_stats(self, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        """As torch's BatchNorm: unbiased variance; `momentum=None` is the cumulative average."""
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        unbiased = (var * n / (n - 1)).to(self.running_var.dtype)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def convert_to_global_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm with its global-batch version for `device`."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:  # the same Parameters, as torch's SyncBatchNorm conversion: a frozen
            new.weight, new.bias = module.weight, module.bias  # teacher's stay requires_grad=False
        return new.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, _convert_cpu(child))
    return module


__all__ = ["GlobalBatchNorm", "convert_to_global_bn"]
