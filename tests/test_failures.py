"""A rank that raises or dies ends the whole job, non-zero, within 60 s, whatever started the
ranks: the local launcher (`sslforge train --nproc 2`), or one process per rank as srun and
submitit start them ("srun style", nobody watching from outside). Faults are injected as they
were seen: a full disk during a checkpoint write, an exception in one rank, a rank killed with
SIGKILL, a rank frozen with SIGSTOP (a node that vanished: its sockets stay open, so only the
heartbeat can tell). tests/conftest.py fails any of these tests that leaves a process behind.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.process_helpers import (fault_env, kill_groups, rank_processes, start_launcher, start_srun_style,
                                   train_args, train_steps, wait_all, wait_for)

END_WITHIN_S = 60  # the requirement: any rank's error ends every rank within a minute


def _start(launch: str, args: list[str], logs: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    if launch == "local":
        logs.mkdir(parents=True, exist_ok=True)
        return [start_launcher(args, 2, logs / "launcher.log", env)]
    return start_srun_style(args, 2, logs, env)


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.glob("*.log")))


def _rank_pid(launch: str, procs: list[subprocess.Popen], rank: int) -> int:
    return rank_processes(procs[0].pid)[rank].pid if launch == "local" else procs[rank].pid


@pytest.mark.parametrize("launch, fault, extra, message", [
    ("srun", "raise", {"step": "4"}, "rank 1 failed: RuntimeError: injected fault in step 4"),
    ("local", "enospc", {}, "no space left on device"),
], ids=["srun-style-exception", "local-full-disk-at-checkpoint"])
def test_a_rank_that_raises_ends_the_job(synth_data: dict, tmp_path: Path, launch: str, fault: str,
                                         extra: dict[str, str], message: str) -> None:
    run_dir, logs, mark = tmp_path / "run", tmp_path / "logs", tmp_path / "fault-fired"
    args = train_args(synth_data, run_dir, "train.steps=500", "train.ckpt_every_steps=3")
    procs = _start(launch, args, logs, fault_env(fault, 1, mark, **extra))
    try:
        wait_for(mark.exists, "the fault", procs)
        codes = wait_all(procs, END_WITHIN_S)
        took = time.time() - mark.stat().st_mtime
    finally:
        kill_groups(procs)
    text = _logs(logs)
    assert None not in codes, f"still running {END_WITHIN_S} s after the fault:\n{text[-4000:]}"
    assert all(code != 0 for code in codes), codes
    assert took < END_WITHIN_S
    assert message in text, text[-4000:]


@pytest.mark.parametrize("launch, sig, victim, message", [
    ("srun", signal.SIGKILL, 1, None),
    ("srun", signal.SIGSTOP, 1, "rank 1 stopped responding"),
    ("srun", signal.SIGSTOP, 0, "has not answered"),  # rank 0 hosts the rendezvous store
    ("local", signal.SIGKILL, 1, None),
], ids=["srun-style-sigkill", "srun-style-frozen", "srun-style-frozen-store-host", "local-sigkill"])
@pytest.mark.slow
def test_a_dead_peer_ends_the_job(synth_data: dict, tmp_path: Path, launch: str, sig: int, victim: int,
                                  message: str | None) -> None:
    """A frozen rank keeps its sockets open, like a node that vanished: only the heartbeat can
    tell, so the survivors' message names how they knew."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    procs = _start(launch, train_args(synth_data, run_dir, "train.steps=500"), logs)
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 3, "training to start", procs)
        psutil.Process(_rank_pid(launch, procs, victim)).send_signal(sig)  # the others are in a collective with it
        killed = time.monotonic()
        survivors = procs if launch == "local" else [p for rank, p in enumerate(procs) if rank != victim]
        codes = wait_all(survivors, END_WITHIN_S)
        took = time.monotonic() - killed
    finally:
        kill_groups(procs)
    text = _logs(logs)
    assert None not in codes, f"still running {END_WITHIN_S} s after rank {victim} died:\n{text[-4000:]}"
    assert all(code != 0 for code in codes), codes
    assert took < END_WITHIN_S
    if message is not None:
        assert message in text, text[-4000:]
