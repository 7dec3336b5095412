"""`sslforge jobs RUN_DIR` for local runs (issue 15, item 5): before, a run trained with
`sslforge train` got "no SLURM jobs recorded". Each local launch is recorded in the run directory
(pid, host, ranks, start, command, output, exit status) and shown with whether it still runs."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from sslforge.launcher.local_jobs import LOCAL_FILE, LocalLaunch, RunInUse, launch_lines, refuse_if_running
from tests.process_helpers import train_args
from tests.test_cli import sslforge


def test_a_finished_local_run_shows_as_done_with_its_step(synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = sslforge(*train_args(synth_data, run_dir, "train.steps=2"), "--nproc", "2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = sslforge("jobs", str(run_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"run dir: {run_dir}"
    assert re.fullmatch(rf"local pid \d+ on {re.escape(socket.gethostname())}  ranks 2  started \S+  done, ended \S+",
                        lines[1]), lines[1]
    assert lines[2].startswith("  command: sslforge train simclr_synth ") and "--nproc 2" in lines[2]
    assert lines[3].startswith("  output: ")  # a pipe here; a file or the terminal for a user
    assert "latest checkpoint: step_00000002" in lines
    assert f"latest step: 2  (metrics: {run_dir / 'metrics.jsonl'})" in lines


def _record(run_dir: Path, **entry: object) -> None:
    base = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": None, "nproc": 1,
            "started": "2026-11-24T10:00:00", "cwd": "/somewhere", "command": "sslforge train x",
            "stdout": "/dev/pts/1", "stderr": "/dev/pts/1"}
    path = run_dir / LOCAL_FILE
    entries = json.loads(path.read_text())["launches"] if path.is_file() else []
    path.write_text(json.dumps({"launches": [*entries, {**base, **entry}]}))


def test_each_state_is_told_apart(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            _record(tmp_path, pid=gone.pid)  # killed (SIGKILL, a reboot): no end was written
            _record(tmp_path, pid=alive.pid, proc_start="1")  # its pid now names another process
            _record(tmp_path, pid=1, host="elsewhere")
            _record(tmp_path, pid=alive.pid, nproc=2, stdout="/data/train.log", stderr="/data/train.log")
            _record(tmp_path, pid=gone.pid, ended="2026-11-24T11:00:00", exit=75)
            _record(tmp_path, pid=gone.pid, ended="2026-11-24T11:00:00", exit=137)
            states = [line.split("  ", 3)[-1] for line in launch_lines(tmp_path) if line.startswith("local pid")]
            assert states == [
                "ended without a status (its process is gone: killed, or the machine restarted)",
                "ended without a status (its process is gone: killed, or the machine restarted)",
                "no status recorded (it ran on elsewhere; this host cannot check it)",
                "running",
                "stopped with a checkpoint (exit 75; the same command resumes it), ended 2026-11-24T11:00:00",
                "failed (killed by SIGKILL), ended 2026-11-24T11:00:00"]
            assert "  output: /data/train.log" in launch_lines(tmp_path)
            assert "  output: the terminal /dev/pts/1" in launch_lines(tmp_path)
            with pytest.raises(RunInUse, match=rf"run_dir {tmp_path} is being trained by `sslforge train x` "
                                               rf"\(pid {alive.pid}, .*kill {alive.pid}"):
                refuse_if_running(tmp_path)
        finally:
            alive.kill()


def test_the_exit_status_is_recorded_when_the_launch_ends(tmp_path: Path) -> None:
    with LocalLaunch(tmp_path, 1) as launch:
        launch.exit_status = 75
    with pytest.raises(RuntimeError), LocalLaunch(tmp_path, 2):
        raise RuntimeError("a crash")
    entries = json.loads((tmp_path / LOCAL_FILE).read_text())["launches"]
    assert [(e["nproc"], e["exit"]) for e in entries] == [(1, 75), (2, 1)]
    assert all(e["pid"] == os.getpid() and e["ended"] >= e["started"] for e in entries)
    refuse_if_running(tmp_path)  # both ended
