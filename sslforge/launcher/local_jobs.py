"""Local launches of a run (`sslforge train`, one rank or `--nproc N`), kept in its run directory
for `sslforge jobs`.

SLURM remembers its jobs (`jobs.json`, scontrol/sacct); a local launch has nobody to ask
afterwards, so the launching process writes down what `jobs` shows: when it starts, its pid,
host, ranks, start time, command and where its output goes; when it ends, its exit status
(0 done, 75 stopped with a checkpoint, anything else failed). A record without an end whose
process is gone (killed by SIGKILL, its machine restarted) shows as ended without a status; one
whose process is alive marks the run directory as in use, and another launch into it is refused.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from sslforge.config import ConfigError
from sslforge.launcher.worker import EXIT_PREEMPTED

LOCAL_FILE = "local_jobs.json"


class RunInUse(ConfigError):
    """A local launch on this host is still training the run directory."""


def describe_status(status: int) -> str:
    """A shell's exit status in words: `exit N`, or `killed by SIGX` for 128 + N."""
    if status > 128 and status - 128 in signal.valid_signals():
        return f"killed by {signal.Signals(status - 128).name}"
    return f"exit {status}"


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux); with the pid, it names one process
    even after the pid is reused. None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def _output(fd: int) -> str:
    """Where this process's `fd` goes: a file path, a terminal, or a pipe's name."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "unknown"


def _entries(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((run_dir / LOCAL_FILE).read_text())["launches"]
    except (OSError, ValueError, KeyError):
        return []


def _write(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    tmp = run_dir / f".{LOCAL_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"launches": entries}, indent=1) + "\n")
    tmp.replace(run_dir / LOCAL_FILE)


def _alive(entry: dict[str, Any]) -> bool | None:
    """Whether the launch's process still runs; None when it ran on another host."""
    if entry["host"] != socket.gethostname():
        return None
    try:
        os.kill(entry["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process holds the pid
    start = _process_start(entry["pid"])
    return start is None or entry.get("proc_start") in (None, start)


def _running(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in _entries(run_dir) if "exit" not in e and e["pid"] != os.getpid() and _alive(e)]


def refuse_if_running(run_dir: Path) -> None:
    """Raise RunInUse when a local launch on this host is still training `run_dir`: two runs
    writing one directory would interleave their checkpoints and metrics."""
    running = _running(run_dir)
    if running:
        entry = running[0]
        raise RunInUse(f"run_dir {run_dir} is being trained by `{entry['command']}` (pid {entry['pid']}, started "
                       f"{entry['started']}); wait for it to end or stop it (kill {entry['pid']}: it checkpoints "
                       "and exits), or give another run_dir")


class LocalLaunch:
    """`with LocalLaunch(run_dir, nproc) as launch: launch.exit_status = ...` records this
    process's launch when entered and its exit status when left (an exception that escapes
    counts as its SystemExit code, 130 for KeyboardInterrupt, else 1)."""

    def __init__(self, run_dir: Path, nproc: int) -> None:
        self.run_dir = run_dir
        self.exit_status: int | None = None
        self.entry: dict[str, Any] = {
            "pid": os.getpid(), "host": socket.gethostname(), "proc_start": _process_start(os.getpid()),
            "nproc": nproc, "started": _now(), "cwd": os.getcwd(),
            "command": shlex.join(["sslforge", *sys.argv[1:]]), "stdout": _output(1), "stderr": _output(2)}

    def __enter__(self) -> "LocalLaunch":
        _write(self.run_dir, [*_entries(self.run_dir), self.entry])
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, SystemExit):
            status = exc.code if isinstance(exc.code, int) else 1
        elif isinstance(exc, KeyboardInterrupt):
            status = 128 + signal.SIGINT
        else:
            status = 1 if exc is not None or self.exit_status is None else self.exit_status
        entries = [{**e, "ended": _now(), "exit": status} if e == self.entry else e for e in _entries(self.run_dir)]
        _write(self.run_dir, entries)


def _state(entry: dict[str, Any]) -> str:
    if "exit" in entry:
        status = entry["exit"]
        if status == 0:
            word = "done"
        elif status == EXIT_PREEMPTED:
            word = "stopped with a checkpoint (exit 75; the same command resumes it)"
        else:
            word = f"failed ({describe_status(status)})"
        return f"{word}, ended {entry['ended']}"
    alive = _alive(entry)
    if alive is None:
        return f"no status recorded (it ran on {entry['host']}; this host cannot check it)"
    if alive:
        return "running"
    return "ended without a status (its process is gone: killed, or the machine restarted)"


def _where(path: str) -> str:
    if path.startswith("/dev/pts/") or path.startswith("/dev/tty"):
        return f"the terminal {path}"
    return path if path.startswith("/") else f"{path} (not a file)"


def launch_lines(run_dir: Path) -> list[str]:
    """What `sslforge jobs` prints for the run's local launches, oldest first."""
    lines = []
    for entry in _entries(run_dir):
        lines.append(f"local pid {entry['pid']} on {entry['host']}  ranks {entry['nproc']}  started {entry['started']}  "
                     f"{_state(entry)}")
        lines.append(f"  command: {entry['command']}  (in {entry['cwd']})")
        out, err = _where(entry["stdout"]), _where(entry["stderr"])
        lines.append(f"  output: {out}" if out == err else f"  output: {out}, errors: {err}")
    return lines


def progress_lines(run_dir: Path) -> list[str]:
    """The run's latest logged step and checkpoint, and where its metrics are."""
    latest = run_dir / "checkpoints" / "latest"
    metrics = run_dir / "metrics.jsonl"
    step = None
    if metrics.is_file():
        with metrics.open("rb") as f:  # the last lines only: the file grows with the run
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            for line in reversed(f.read().splitlines()):
                try:
                    step = json.loads(line)["step"]
                    break
                except (ValueError, KeyError, TypeError):
                    continue
    return [f"latest checkpoint: {latest.read_text().strip() if latest.is_file() else 'none yet'}",
            f"latest step: {step if step is not None else 'none logged yet'}  (metrics: {metrics})"]


__all__ = ["LOCAL_FILE", "LocalLaunch", "RunInUse", "describe_status", "launch_lines", "progress_lines",
           "refuse_if_running"]
