"""Per-iteration schedules (as in DINO): one value per optimiser step, built once."""
from __future__ import annotations

import math

import numpy as np


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The linear (Goyal et al.) or square-root scaling rule with reference batch 256."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    return base_lr


def cosine_schedule(peak: float, final: float, total_steps: int, warmup_steps: int,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup from `warmup_start` to `peak`, then cosine decay to `final`."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, peak, warmup_steps, endpoint=False)
    rest = np.arange(total_steps - warmup_steps)
    decay = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * rest / max(len(rest), 1)))
    return np.concatenate([warmup, decay])


def momentum_schedule(base: float, total_steps: int) -> np.ndarray:
    """EMA momentum rising from `base` towards 1 on a half cosine, one value per step (BYOL,
    MoCo v3, DINO): m_t = 1 - (1 - base) * (cos(pi * t / T) + 1) / 2."""
    return cosine_schedule(base, 1.0, total_steps, 0)


def per_epoch(values: np.ndarray, steps_per_epoch: int, total_steps: int) -> np.ndarray:
    """A schedule published per epoch (DINO's teacher temperature), one value per step: each
    epoch's value for all of its steps, the last value past the end of `values`."""
    epochs = np.minimum(np.arange(total_steps) // max(steps_per_epoch, 1), len(values) - 1)
    return np.asarray(values, dtype=float)[epochs]
