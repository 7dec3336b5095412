"""Losses compute in float32, whatever autocast surrounds them.

Under bf16 autocast a matmul is redone in bf16 even when its inputs were cast to float32, so
`a.float() @ b.float().T` is not enough: similarity logits divided by a small temperature then
carry bf16's 0.4% rounding into every exponent (2% error in NT-Xent's gradient at batch 256,
T=0.1). Softmax, cross-entropy, log-sum-exp and Sinkhorn need the same protection, so every loss
in this package runs inside `float32_loss`: autocast off for its inputs' devices, floating inputs
cast to float32. The gradients it returns, and any collective inside it, are float32 too.
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _to_float32(value: Any) -> Any:
    """Floating tensors (also inside lists, tuples and dicts, as multi-crop losses take them)."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, list):
        return [_to_float32(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


@contextmanager
def autocast_disabled(*values: Any) -> Iterator[None]:
    """Autocast off for the device type of every tensor in `values` (autocast is per device
    type: turning off the CPU's leaves a CUDA region in bf16)."""
    device_types = {t.device.type for t in _tensors(values)}
    with ExitStack() as stack:
        for device_type in sorted(device_types):
            if torch.amp.is_autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def float32_loss(fn: F) -> F:
    """Decorator: `fn` runs with autocast disabled and its floating tensor arguments in float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_disabled(args, kwargs):
            return fn(*_to_float32(args), **_to_float32(kwargs))

    return wrapper  # type: ignore[return-value]


__all__ = ["autocast_disabled", "float32_loss"]
