"""Non-finite steps and state: what a skipped step puts back, what a checkpoint may not hold.

A step is skipped, by every rank together, when any rank's loss or the reduced gradients hold a
NaN or inf. The forward has already run by then, and norm layers update their running statistics
during it, before the loss is known: the trainer copies the buffers the method declares
(`Method.forward_buffers`) before each forward and puts them back on a skip. Saving checks every
parameter, floating buffer and optimiser state tensor on every rank, so a non-finite state never
reaches disk, and `keep_last` can only ever prune finite checkpoints older than a finite one.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import Any

import torch
import torch.nn as nn


class BufferSnapshot:
    """Copies of some buffers: one `torch.cat` per dtype and device (running statistics of a
    ResNet-50: about 200 KB), written back only when the step is skipped."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buffer in buffers:
            self.groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        self.copies = {key: torch.cat([b.detach().reshape(-1) for b in group])
                       for key, group in self.groups.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for key, group in self.groups.items():
            for buffer, saved in zip(group, self.copies[key].split([b.numel() for b in group])):
                buffer.copy_(saved.view_as(buffer))


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every floating entry of this rank's `tensors` is finite: one fused max-norm per
    device and dtype, NaN or inf exactly when some entry is."""
    floats = [t for t in tensors if t.is_floating_point()]
    return not floats or bool(torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=math.inf)).item())


def grads_finite(module: nn.Module) -> bool:
    """Whether this rank's `p.grad`s are finite (a finite loss can still overflow in the
    backward). Under ZeRO 0 they are the gradients DeepSpeed has already averaged over ranks;
    ZeRO 1/2 free them once reduced into the optimiser's partitions, and DeepSpeed's own step
    checks those (the trainer reads its verdict from `engine.was_step_applied()`)."""
    return all_finite([p.grad for p in module.parameters() if p.grad is not None])


def nonfinite_tensors(module: nn.Module, *optimizers: Any) -> list[str]:
    """Names of this rank's parameters, floating buffers and optimiser state entries that hold a
    NaN or inf. `optimizer.state` is the torch optimiser's (ZeRO 1/2: this rank's partition)."""
    bad = [name for name, t in chain(module.named_parameters(), module.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    for which, optimizer in enumerate(optimizers):
        prefix = f"optimizer {which} " if len(optimizers) > 1 else "optimizer "
        for index, state in enumerate(getattr(optimizer, "state", {}).values()):
            bad += [f"{prefix}state {index}.{key}" for key, value in state.items()
                    if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    return bad


def refusal_message(bad: list[str], step: int, latest: str | None) -> str:
    """Why a checkpoint was not written, naming the first offending tensors."""
    named = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    where = f"{len(bad)} tensor(s) with NaN/inf: {named}" if bad else "on another rank"
    kept = f"the last finite checkpoint is {latest}" if latest else "no checkpoint was written before"
    return f"non-finite state at step {step} ({where}); checkpoint not written, {kept}"


def skipped_summary(total: int, first: int, last: int, steps: int) -> str:
    """One line on the steps skipped over the whole run (step numbers as in metrics.jsonl)."""
    where = f"at step {first}" if first == last else f"first at step {first}, last at step {last}"
    return (f"{total} of {steps} steps were skipped for NaN/inf in the loss, running statistics or "
            f"gradients ({where}); "
            "the model did not learn from those batches (`nonfinite_skipped` in metrics.jsonl)")


__all__ = ["BufferSnapshot", "all_finite", "grads_finite", "nonfinite_tensors", "refusal_message", "skipped_summary"]
