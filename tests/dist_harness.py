"""Run a function on N local gloo ranks (spawned processes) and collect each rank's result."""
from __future__ import annotations

import io
import os
import queue as queue_module
import time
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


def _dead(procs: list[Any], results: dict[int, Any]) -> dict[int, int]:
    return {r: p.exitcode for r, p in enumerate(procs) if r not in results and p.exitcode is not None}


def _check_alive(procs: list[Any], results: dict[int, Any], deadline: float) -> None:
    """A rank that exited without reporting (killed, `os._exit`) fails the call now, not at the
    timeout; its result would have been queued before it exited."""
    dead = _dead(procs, results)
    if dead:
        raise RuntimeError(f"rank(s) exited without a result: {dead} (rank: exit code)")
    if time.monotonic() > deadline:
        raise TimeoutError(f"ranks {sorted(set(range(len(procs))) - set(results))} gave no result in time")


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(*args) on every rank after the process group is up; returns results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, value, error = queue.get(timeout=1.0)
            except queue_module.Empty:
                try:  # a result put just before its rank exited may still be in the pipe
                    rank, value, error = queue.get(timeout=5.0 if _dead(procs, results) else 0.0)
                except queue_module.Empty:
                    _check_alive(procs, results, deadline)
                    continue
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
