"""Start training the ways a cluster does, and watch it from outside.

- `start_launcher`: `sslforge train --nproc N` (the local launcher), as a terminal starts it: in a
  process group of its own, so a test can send a Ctrl-C to the whole group as the terminal does;
- `start_srun_style`: one `python -m sslforge.cli train` process per rank, given torch.distributed's
  variables, as srun and submitit start them (no torchrun agent to watch them);
- `fault_env`: a fault from tests/faults/sitecustomize.py injected into one rank.
Output goes to files (a pipe nobody reads would block a rank that writes a traceback).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from sslforge.launcher.env import free_port

ROOT = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "faults"
SMALL = ["data.image_size=16", "optim.batch_size=16", "model.proj_hidden_dim=64", "data.num_workers=1",
         "logging.progress=false", "train.log_every_steps=1"]


def train_args(data: dict, run_dir: Path, *overrides: str) -> list[str]:
    """`sslforge train` arguments for the tiny synthetic recipe, without evaluation or wandb."""
    return ["train", "simclr_synth", f"data.train={data['train']}", "data.val=null", f"run_dir={run_dir}",
            "eval.every_epochs=0", "logging.wandb_mode=disabled", *SMALL, *overrides]


def fault_env(fault: str, rank: int, mark: Path, **extra: str) -> dict[str, str]:
    """Environment that injects `fault` into `rank`; `mark` appears when it fires."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])),
            "SSLFORGE_FAULT": fault, "SSLFORGE_FAULT_RANK": str(rank), "SSLFORGE_FAULT_MARK": str(mark),
            **{f"SSLFORGE_FAULT_{k.upper()}": v for k, v in extra.items()}}


def _popen(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "sslforge.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)


def start_launcher(args: list[str], nproc: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return _popen([*args, "--nproc", str(nproc)], log, env or {})


def start_srun_style(args: list[str], world: int, logs: Path,
                     env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """`world` rank processes of one job, logs in `logs`/rank{R}.log."""
    port = str(free_port())
    logs.mkdir(parents=True, exist_ok=True)
    return [_popen(args, logs / f"rank{rank}.log",
                   {**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1"})
            for rank in range(world)]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def latest_step(run_dir: Path) -> int | None:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else None


def wait_for(predicate: Callable[[], object], what: str, procs: list[subprocess.Popen],
             timeout: float = 180) -> None:
    """Wait until `predicate()`; fail early when one of `procs` has already exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        exited = [p.args for p in procs if p.poll() is not None]
        assert not exited, f"exited while waiting for {what}: {exited}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit statuses of `procs`, None for those still running after `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    return [proc.poll() for proc in procs]


def rank_processes(launcher_pid: int) -> dict[int, psutil.Process]:
    """The rank processes under the launcher (not their data workers, which inherit RANK)."""
    ranks: dict[int, psutil.Process] = {}
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        rank = proc.environ().get("RANK")
        if rank is not None and proc.parent().environ().get("RANK") is None:
            ranks[int(rank)] = proc
    return ranks


def kill_groups(procs: list[subprocess.Popen]) -> None:
    """Clean-up after a failed assertion: SIGKILL each process's group (it and its data workers)."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also when the leader is gone but its workers are not
        except ProcessLookupError:
            pass
        proc.wait()
