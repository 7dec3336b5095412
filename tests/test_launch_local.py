"""`sslforge train --nproc 2`: the local launcher trains, and owns its ranks.

A signal to it (`kill PID`, SIGTERM to its process group, Ctrl-C to the terminal's group) makes
every rank checkpoint the step it reached; it waits for them and exits 75, and the same command
resumes from that step. Ctrl-C twice stops at once (130). No rank or data worker outlives it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.process_helpers import (ROOT, SMALL, kill_groups, latest_step, records, start_launcher, train_args,
                                   train_steps, wait_for)
from tests.test_cli import sslforge

STOP_WITHIN_S = 60
STEPS = 16


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def test_two_local_ranks_train_log_and_checkpoint(synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = sslforge("train", "simclr_synth", f"data.train={synth_data['train']}",
                      f"data.val={synth_data['val']}", f"run_dir={run_dir}", "train.steps=6",
                      "eval.every_epochs=0", "eval.at_end=true", "logging.wandb_mode=offline", *SMALL, "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("never reaches its peak") == 1  # the recipe's warm-up outlasts 6 steps: rank 0 says so
    train = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["world_size"] == 2 for r in train)
    for key in ("lr", "samples_per_s", "data_wait_frac", "embedding_std", "skipped_samples"):
        assert key in train[-1], key
    assert any("knn_top1" in r for r in records(run_dir))  # final evaluation
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run_dir / "config.yaml").is_file()
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert wandb_runs and any(p.suffix == ".wandb" for p in wandb_runs[0].iterdir())


def _stop_with(sig: int, to_group: bool, nproc: int, args: list[str], run_dir: Path,
               log: Path) -> tuple[int, float]:
    """Start `sslforge train`, signal it once training runs; (exit status, seconds it took to exit).
    Every process under it must be gone when it exits."""
    launcher = start_launcher(args, nproc, log)
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 3, "training to start", [launcher])
        under = _descendants(launcher.pid)  # the ranks (if not in this process) and their data workers
        assert under
        (os.killpg if to_group else os.kill)(launcher.pid, sig)
        sent = time.monotonic()
        code = launcher.wait(timeout=STOP_WITHIN_S)
        took = time.monotonic() - sent
        outlived = _running(under)  # now: the clean-up below kills whatever is left
    finally:
        kill_groups([launcher])
    assert not outlived, f"outlived the launcher: {outlived}"
    return code, took


@pytest.mark.parametrize("sig, to_group, nproc", [(signal.SIGTERM, False, 2), (signal.SIGTERM, True, 2),
                                                  (signal.SIGINT, True, 2), (signal.SIGINT, True, 1)],
                         ids=["kill-pid", "sigterm-to-group", "ctrl-c", "ctrl-c-one-rank"])
def test_a_signal_to_sslforge_train_checkpoints_the_current_step_and_exits_75(
        synth_data: dict, tmp_path: Path, sig: int, to_group: bool, nproc: int) -> None:
    run_dir = tmp_path / "run"
    # No periodic checkpoint before the end: the one on disk is the signal's.
    args = train_args(synth_data, run_dir, f"train.steps={STEPS}", "train.ckpt_every_steps=1000")
    code, took = _stop_with(sig, to_group, nproc, args, run_dir, tmp_path / "launcher.log")
    log = (tmp_path / "launcher.log").read_text()
    assert code == 75, log[-3000:]
    assert took < STOP_WITHIN_S
    stopped = train_steps(run_dir)
    assert stopped == list(range(1, len(stopped) + 1)) and 3 <= len(stopped) < STEPS
    assert latest_step(run_dir) == stopped[-1]  # the step every rank had reached: nothing lost
    assert log.count(f"stopped at step {stopped[-1]} with a checkpoint") == 1, log[-3000:]
    if sig == signal.SIGTERM and not to_group:  # the same command resumes from that step
        result = sslforge(*args, "--nproc", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        assert train_steps(run_dir)[len(stopped):] == list(range(stopped[-1] + 1, STEPS + 1))


def test_ctrl_c_twice_stops_every_rank_at_once(synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = train_args(synth_data, run_dir, "train.steps=500", "train.ckpt_every_steps=1000")
    launcher = start_launcher(args, 2, tmp_path / "launcher.log")
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 3, "training to start", [launcher])
        under = _descendants(launcher.pid)
        os.killpg(launcher.pid, signal.SIGINT)
        time.sleep(0.1)  # two presses, before the ranks can have checkpointed and exited
        os.killpg(launcher.pid, signal.SIGINT)
        sent = time.monotonic()
        code = launcher.wait(timeout=STOP_WITHIN_S)
        took = time.monotonic() - sent
    finally:
        kill_groups([launcher])
    assert code == 130, (tmp_path / "launcher.log").read_text()[-3000:]
    assert took < 10  # "at once": no checkpoint, no collective to wait for
    assert not _running(under), f"outlived the launcher: {_running(under)}"


def test_in_a_rank_ctrl_c_asks_for_a_checkpoint_and_a_second_one_interrupts() -> None:
    """A rank that gets the terminal's Ctrl-C itself (`--nproc 1`, or under torchrun/srun)."""
    code = ("import os, signal; from sslforge.trainer import preemption; preemption.install_handlers(); "
            "os.kill(os.getpid(), signal.SIGINT); print('stop requested', preemption.stop_requested()); "
            "os.kill(os.getpid(), signal.SIGINT); print('still running')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["stop requested True"]
    assert result.returncode == -signal.SIGINT and "KeyboardInterrupt" in result.stderr


def test_runs_as_one_rank_under_external_torchrun(synth_data: dict, tmp_path: Path) -> None:
    """`torchrun ... -m sslforge.cli train` : every process is one rank of the same job."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "sslforge.cli", *train_args(synth_data, run_dir, "train.steps=2")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["world_size"] for r in records(run_dir) if "loss" in r] == [2, 2]


def test_a_rank_reaps_the_data_workers_fork_server_and_resource_tracker_before_it_exits() -> None:
    """The exit hook of every rank (and of a one-rank launcher) leaves no helper process behind:
    seen in CI, the resource tracker outlived a one-rank `sslforge train` stopped by Ctrl-C."""
    script = textwrap.dedent("""
        import atexit, psutil
        from sslforge.data_pipeline.stream import start_worker_server
        from sslforge.launcher.watchdog import kill_data_workers_at_exit
        kill_data_workers_at_exit()
        start_worker_server()
        helpers = psutil.Process().children()
        atexit._run_exitfuncs()  # what the interpreter runs on its way out, run now to look after it
        print([p.cmdline()[-1][:60] for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE])
        print(len(helpers))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    alive, started = done.stdout.splitlines()
    assert int(started) == 2  # the tracker and the fork server
    assert alive == "[]", f"still running after the exit hook: {alive}"
