"""Momentum (EMA) copies: MoCo's key encoder, BYOL's target, DINO's teacher.

The copy lives outside the optimiser (its parameters do not require grad) and follows the online
network after each optimiser step: target = m * target + (1 - m) * online, parameters only.
Buffers (BatchNorm running statistics) are the copy's own, updated by its own forwards, as in
the MoCo, BYOL and DINO code.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters do not require grad: the EMA target's starting point."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float, buffers: bool = False) -> None:
    """target = momentum * target + (1 - momentum) * online, in place, for every parameter;
    with `buffers`, also for floating buffers (other buffers copied): a model EMA that is
    evaluated itself, as timm's ModelEmaV2, never runs a forward in training mode to keep its
    batch-norm statistics."""
    pairs = _matched_parameters(target, online)
    if buffers:
        own = dict(online.named_buffers())
        for name, buffer in target.named_buffers():
            if buffer.is_floating_point():
                pairs.append((buffer, own[name]))
            else:
                buffer.copy_(own[name])
    if not pairs:
        return
    targets = [t for t, _ in pairs]
    onlines = [o.detach().to(t.dtype) for t, o in pairs]
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)


def _matched_parameters(target: nn.Module, online: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, online) parameter pairs by name; a missing name or a shape mismatch is an error,
    not a silently skipped parameter."""
    t, o = dict(target.named_parameters()), dict(online.named_parameters())
    if t.keys() != o.keys():
        only_t, only_o = sorted(t.keys() - o.keys()), sorted(o.keys() - t.keys())
        raise ValueError(f"EMA target and online parameters differ: only in target {only_t[:5]}, "
                         f"only in online {only_o[:5]}")
    for name, param in t.items():
        if param.shape != o[name].shape:
            raise ValueError(f"EMA parameter '{name}' has shape {tuple(param.shape)} in the target "
                             f"but {tuple(o[name].shape)} in the online network")
    return [(param, o[name]) for name, param in t.items()]


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Run `module` without recording gradients for its parameters (a GAN's discriminator while
    the generator's loss goes through it): activations still carry gradients to the inputs."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
