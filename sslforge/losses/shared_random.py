"""Random draws that do not depend on how the global batch is split over ranks.

A loss that draws per sample (HCSC's masks, MoCHi's mixing) must give sample n of the global
batch the same numbers on 1 rank with B samples as on N ranks with B/N each, or N ranks stop
equalling one. The caller seeds a generator identically on every rank; every rank then draws
the whole (B, cols) table and keeps its own rows r*b .. r*b+b-1, so the generators also stay in
step for the next draw. The table comes in pieces of at most `UNIFORM_CHUNK` numbers whose
boundaries depend on the global shape only, so memory stays bounded (B=256 against a queue of
16384: one 16 MB draw) and the numbers equal one `torch.rand(B, cols)` call whatever the split.
Every rank must hold the same b.
"""
from __future__ import annotations

import torch

from sslforge import distributed

UNIFORM_CHUNK = 1 << 24  # uniforms per draw (64 MB of float32)


def shared_uniforms(rows: int, cols: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """This rank's `rows` rows of a (rows * world_size, cols) U[0, 1) table, on `device`."""
    total, start = rows * distributed.world_size(), rows * distributed.rank()
    step = max(1, UNIFORM_CHUNK // max(cols, 1))
    mine = [torch.empty(0, cols, device=generator.device)]
    for first in range(0, total, step):
        piece = torch.rand(min(step, total - first), cols, generator=generator, device=generator.device)
        lo, hi = max(first, start), min(first + len(piece), start + rows)
        if lo < hi:
            mine.append(piece[lo - first:hi - first])
    return torch.cat(mine).to(device)


def shared_randint(rows: int, cols: int, high: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """This rank's rows of a (rows * world_size, cols) table of integers uniform in [0, high):
    floor(u * high) of a `shared_uniforms` table (clamped, as float32 rounding can reach high)."""
    if high < 1:
        raise ValueError(f"shared_randint: high must be >= 1, got {high}")
    u = shared_uniforms(rows, cols, generator, device)
    return (u * high).long().clamp_(max=high - 1)
