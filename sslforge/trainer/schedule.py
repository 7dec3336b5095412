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
