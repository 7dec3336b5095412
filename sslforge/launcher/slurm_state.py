"""A SLURM job's state, from `scontrol` while the controller remembers it, else from `sacct`.

submitit's own watcher only reads `sacct`, which needs an accounting database that small
clusters (and the test cluster) do not run; `scontrol show job` answers for queued, running and
recently finished jobs everywhere, and `sacct` covers older ones where accounting exists.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

# States a job does not leave by itself (a requeued job goes back to PENDING, never through these).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # SLURM's JobState, e.g. PENDING, RUNNING, COMPLETED; UNKNOWN when nobody knows
    exit_code: int = 0
    signal: int = 0
    restarts: int = 0
    reason: str = ""

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @property
    def exit_status(self) -> int:
        """What `launch --wait` exits with: 0 only for a job that completed successfully."""
        if self.state == "COMPLETED" and self.exit_code == 0:
            return 0
        if self.exit_code:
            return self.exit_code
        return 128 + self.signal if self.signal else 1


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _split_exit(code: str) -> tuple[int, int]:
    status, _, sig = code.partition(":")
    return int(status or 0), int(sig or 0)


def _from_scontrol(job_id: str) -> Optional[JobState]:
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if not out:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))
    if "JobState" not in fields:
        return None
    code, sig = _split_exit(fields.get("ExitCode", "0:0"))
    return JobState(job_id, fields["JobState"], code, sig, int(fields.get("Restarts", 0)),
                    fields.get("Reason", "None"))


def _from_sacct(job_id: str) -> Optional[JobState]:
    out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"])
    lines = [line for line in (out or "").splitlines() if line.strip()]
    if not lines:
        return None
    state, code = lines[-1].split("|")[:2]
    status, sig = _split_exit(code)
    return JobState(job_id, state.split()[0], status, sig)  # "CANCELLED by 0" -> CANCELLED


def job_state(job_id: str) -> JobState:
    return _from_scontrol(job_id) or _from_sacct(job_id) or JobState(job_id, "UNKNOWN")


def wait(job_id: str, poll_s: float = 5.0, report: Callable[[JobState], None] = lambda s: None) -> JobState:
    """Block until the job ends (through any number of requeues); `report` sees each change."""
    last: Optional[JobState] = None
    unknown_since: Optional[float] = None
    while True:
        state = job_state(job_id)
        if state != last:
            report(state)
            last = state
        if state.finished:
            return state
        if state.state == "UNKNOWN":  # e.g. slurmctld restarting; give up only after a while
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > 600:
                return state
        else:
            unknown_since = None
        time.sleep(poll_s)
