"""What each parameter group gets at each step: learning rate, weight decay, frozen or not.

The method's `param_groups` carry the rules (`no_decay`, `fixed_lr`, `freeze_epochs`); the
optimiser's groups keep them as keys, which ZeRO's wrapped optimiser keeps too, so one function
sets every group's values before each step under any ZeRO stage.

A frozen group must not move at all, optimiser state included (DINO cancels its last layer's
gradients for the first epoch). A learning rate of 0 alone is not enough: LARS and SGD fold the
weight decay into the momentum buffer and Adam's moments take in the gradient. So the group's
gradients are zeroed as autograd produces them (a tensor hook runs before DeepSpeed's own
gradient hooks and reductions, under every ZeRO stage) and its lr and weight decay are 0: the
parameters stay bit-identical and the momentum / moment buffers stay zero. (Adam's step count
still advances for the group; DINO's code leaves the gradient None instead, which ZeRO's
flattened partitions cannot express.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from omegaconf import DictConfig

from sslforge.trainer.schedule import cosine_schedule, scaled_lr


@dataclass
class StepValues:
    """This step's trainer-owned values."""

    lr: float
    weight_decay: float


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Steps of a duration given in (possibly fractional) epochs: warm-up, frozen groups."""
    return int(round(epochs * steps_per_epoch))


def warmup_warnings(cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> list[str]:
    """A warm-up as long as the run or longer (a short test run of a full recipe, a small
    dataset): the learning rate never reaches its peak and the cosine never starts. One line
    for `optim` and one per part that sets its own warm-up."""
    given = [("optim.warmup_epochs", cfg.optim.warmup_epochs)]
    given += [(f"optim.parts.{name}.warmup_epochs", part.warmup_epochs)
              for name, part in cfg.optim.get("parts", {}).items() if part.warmup_epochs is not None]
    lines = []
    for key, epochs in given:
        warmup = epochs_to_steps(epochs, steps_per_epoch)
        if warmup >= total_steps > 0 and epochs > 0:
            lines.append(f"{key}={epochs:g} is {warmup} steps ({steps_per_epoch} per epoch), and the run has "
                         f"{total_steps}: the learning rate never reaches its peak; lower {key} or train longer")
    return lines


class GroupRules:
    """Learning rate and weight decay per step, and the steps each group stays frozen."""

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        optim = cfg.optim
        self.peak_lr = scaled_lr(optim.base_lr, optim.batch_size, optim.lr_scaling)
        warmup = epochs_to_steps(optim.warmup_epochs, steps_per_epoch)
        final_lr = self.peak_lr if optim.lr_schedule == "constant" else optim.min_lr
        self.lr = cosine_schedule(self.peak_lr, final_lr, total_steps, warmup, optim.warmup_start_lr)
        end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
        self.weight_decay = cosine_schedule(optim.weight_decay, end, total_steps, 0)
        self.steps_per_epoch = steps_per_epoch
        self._step = 0  # read by the freeze hooks during backward

    def prepare(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The method's groups with `freeze_epochs` turned into steps and the freeze hooks set;
        call before the optimiser and the engine are built (ZeRO flattens the parameters)."""
        out = []
        for group in groups:
            group = dict(group)
            freeze_steps = epochs_to_steps(group.pop("freeze_epochs", 0), self.steps_per_epoch)
            out.append({**group, "freeze_steps": freeze_steps, "fixed_lr": bool(group.get("fixed_lr"))})
            if freeze_steps:
                for p in group["params"]:
                    p.register_hook(self._zero_while_frozen(freeze_steps))
        return out

    def _zero_while_frozen(self, freeze_steps: int):  # type: ignore[no-untyped-def]
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(grad) if self._step < freeze_steps else grad
        return hook

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> StepValues:
        """Set every group's lr and weight decay for `step`; returns the scheduled values."""
        self._step = step
        values = StepValues(float(self.lr[step]), float(self.weight_decay[step]))
        for group in optimizer.param_groups:
            frozen = step < group.get("freeze_steps", 0)
            group["lr"] = 0.0 if frozen else self.peak_lr if group.get("fixed_lr") else values.lr
            group["weight_decay"] = 0.0 if frozen or group.get("no_decay") else values.weight_decay
        return values


@torch.no_grad()
def clip_per_parameter(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm at most `max_norm` (DINO's `clip_gradients`:
    coefficient max_norm / (norm + 1e-6), applied only when below 1)."""
    for p in parameters:
        if p.grad is not None:
            coef = max_norm / (p.grad.norm(2) + 1e-6)
            p.grad.mul_(torch.clamp(coef, max=1.0))


def method_schedules(schedules: dict[str, np.ndarray], total_steps: int) -> dict[str, np.ndarray]:
    """The method's declared schedules, checked to have one value per step."""
    for name, values in schedules.items():
        if len(values) != total_steps:
            raise ValueError(f"method schedule '{name}' has {len(values)} values for {total_steps} steps")
    return schedules
