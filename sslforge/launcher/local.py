"""Local multi-process launch: this process starts one child per rank and owns them.

Each rank is `python -m sslforge.launcher.worker CONFIG` with torch.distributed's variables, in a
session of its own, so a terminal's Ctrl-C (sent to the whole foreground process group) reaches
only this launcher, which decides for every rank:

- the first SIGTERM or SIGINT goes to every rank as SIGTERM: the ranks agree on the stop,
  checkpoint that exact step and exit 75; the launcher waits for all of them and exits 75;
- a second one (Ctrl-C twice) kills every rank's process group (rank and data workers) at once;
  exit 130 (SIGINT) or 143 (SIGTERM);
- a rank that fails (any status but 0 and 75) fails the job: the others, which can only wait
  for it in a collective, get `FAILURE_GRACE_S` to end by themselves (their watchdog stops them,
  and the failed rank finishes printing its error), then are killed; the launcher exits with the
  failed rank's status (128 + N when signal N killed it).

Nothing started here outlives the call: a rank's process group is swept with SIGKILL as soon as
its leader has exited (before it is reaped, so the id cannot have been reused), every group is
killed on the way out, and the ranks end themselves if the launcher is killed
(`watchdog.LAUNCHER_PID_VAR`). torchrun is not used: its agent answers a signal with its own
timeout and SIGKILL, and its exit status does not carry the ranks' 75.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from sslforge.launcher.env import free_port
from sslforge.launcher.local_jobs import describe_status
from sslforge.launcher.watchdog import LAUNCHER_PID_VAR
from sslforge.launcher.worker import EXIT_PREEMPTED

POLL_S = 0.1
FAILURE_GRACE_S = 5.0
SIGNALS_HANDLED = (signal.SIGTERM, signal.SIGINT)


def _say(message: str) -> None:
    print(f"sslforge: {message}", file=sys.stderr, flush=True)


def _exit_status(returncode: int) -> int:
    """A shell's view of a child's status: 128 + N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


def _start_rank(config_path: Path, rank: int, nproc: int, port: int) -> subprocess.Popen:
    threads = str(max(1, (os.cpu_count() or 1) // nproc))  # share the cores, do not oversubscribe
    env = {"OMP_NUM_THREADS": threads, **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), LAUNCHER_PID_VAR: str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "sslforge.launcher.worker", str(config_path)], env=env,
                            start_new_session=True)


class _Signals:
    """Records SIGTERM/SIGINT while installed; the launcher acts on them outside the handler."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _on(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __enter__(self) -> "_Signals":
        self._previous = {sig: signal.signal(sig, self._on) for sig in SIGNALS_HANDLED}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class _Ranks:
    """The rank processes and the statuses of those that ended."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.status: dict[int, int] = {}
        self.failed: tuple[int, int, float] | None = None  # (rank, status, when) of the first failure

    def running(self) -> list[subprocess.Popen]:
        return [p for rank, p in enumerate(self.procs) if rank not in self.status]

    def reap(self) -> None:
        """Record every rank that has exited, after sweeping what it left in its process group."""
        for rank, proc in enumerate(self.procs):
            if rank in self.status or os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                continue
            _killpg(proc)  # its leader is a zombie until wait(): the group id cannot be reused yet
            self.status[rank] = status = _exit_status(proc.wait())
            if status not in (0, EXIT_PREEMPTED) and self.failed is None:
                self.failed = (rank, status, time.monotonic())
                _say(f"error: rank {rank} exited ({describe_status(status)}); stopping the other ranks")

    def send(self, sig: int) -> None:
        for proc in self.running():
            os.kill(proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL every process group not reaped yet (ranks and their data workers), then reap."""
        for proc in self.procs:
            if proc.returncode is None:
                _killpg(proc)
        for proc in self.procs:
            proc.wait()


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _supervise(ranks: _Ranks, signals: _Signals) -> int:
    """Wait for the ranks, acting on signals and failures; returns the job's exit status."""
    handled = 0
    while ranks.running():
        if len(signals.received) > handled:
            handled = len(signals.received)
            if handled > 1:
                _say("stopping every rank now, without a checkpoint")
                return 128 + signals.received[-1]
            _say(f"{signal.Signals(signals.received[0]).name}: every rank checkpoints its current step and "
                 "stops; a second Ctrl-C or SIGTERM stops at once")
            ranks.send(signal.SIGTERM)
        ranks.reap()
        if ranks.failed is not None and time.monotonic() - ranks.failed[2] > FAILURE_GRACE_S:
            break
        time.sleep(POLL_S)
    if ranks.failed is not None:
        return ranks.failed[1]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in ranks.status.values() else 0


def launch_local(config_path: Path, nproc: int) -> int:
    """Run `nproc` ranks of the worker on this machine; returns the job's exit status: 0, 75
    (stopped on a signal with a checkpoint), or the first failed rank's."""
    port = free_port()
    ranks = _Ranks()
    with _Signals() as signals:
        try:
            for rank in range(nproc):
                ranks.procs.append(_start_rank(config_path, rank, nproc, port))
            return _supervise(ranks, signals)
        finally:
            ranks.kill()
