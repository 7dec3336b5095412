"""Run a function on N local gloo ranks (spawned processes) and collect each rank's result."""
from __future__ import annotations

import io
import os
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from sslforge.launcher.env import free_port


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, queue: Any, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    try:
        from sslforge.launcher.env import init_distributed

        init_distributed("gloo", timeout_min=5)
        buffer = io.BytesIO()  # by value: shared-memory tensors die with this process
        torch.save(fn(*args), buffer)
        queue.put((rank, buffer.getvalue(), None))
    except BaseException:  # report, never hang the parent
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(*args) on every rank after the process group is up; returns results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, value, error = queue.get(timeout=timeout)
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
