"""`sslforge launch --slurm` against a real one-node SLURM (scripts/ensure_slurm.sh), no mocks.

Every job is 2 CPU tasks (= 2 gloo ranks) of the tiny synthetic recipe. SLURM delays a requeued
job's start by two minutes (BeginTime); the tests move that start to now with
`scontrol update StartTime=now` instead of waiting, which changes nothing else.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from sslforge.launcher.slurm_state import JobState, job_state
from tests.process_helpers import fault_env

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30
TINY = ["slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1", "slurm.partition=cpu",
        "slurm.time=00:10:00", "slurm.signal_delay_s=30", "optim.batch_size=16", "data.image_size=16",
        "model.proj_hidden_dim=64", "data.num_workers=1", "logging.progress=false", "logging.wandb_mode=disabled",
        "train.log_every_steps=1", f"train.steps={STEPS}", "eval.every_epochs=0", "data.val=null"]


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """Start (installing where missing) the one-node cluster; stop it after this module."""
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure_slurm.sh")], check=True, timeout=900)
    yield
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure_slurm.sh"), "stop"], check=True, timeout=120)


def launch_args(data: dict, run_dir: Path, *overrides: str) -> list[str]:
    return ["launch", "simclr_synth", *TINY, f"data.train={data['train']}", f"run_dir={run_dir}", *overrides,
            "--slurm"]


def sslforge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslforge.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


class Launch:
    """`sslforge launch ... --slurm --wait` running in the background, as a script would use it."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sslforge.cli", *args, "--wait"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.match(r"submitted SLURM job (\d+)", first)
        assert match, first + self.proc.stderr.read()
        self.job_id = match.group(1)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                subprocess.run(["scancel", self.job_id])
        return self.proc.returncode, err


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def job_processes(job_id: str) -> list[psutil.Process]:
    """Every process of the job still alive (tasks and their data workers)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def start_requeued_now(job_id: str) -> JobState:
    """Wait for the job to be back in the queue after a requeue, for its last run's processes to
    be gone and its node to be done cleaning up, then skip SLURM's start delay.

    The wait matters: slurmd revokes the job's credential when the last run ends, at a time in
    whole seconds, and refuses a launch whose credential was issued in that second or before it
    ("Killing non-startable batch JobId=N: Job credential revoked": the job FAILS). SLURM's own
    two-minute delay never meets this; a start forced in the same second does."""
    wait_for(lambda: job_state(job_id).state == "PENDING" and job_state(job_id).restarts >= 1,
             f"job {job_id} to be requeued", timeout=120)
    wait_for(lambda: not job_processes(job_id), f"job {job_id}'s processes to end", timeout=120)
    wait_for(lambda: "comp" not in _node_states(), f"job {job_id}'s node to finish its clean-up", timeout=120)
    time.sleep(CREDENTIAL_CLOCK_S)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    return job_state(job_id)


CREDENTIAL_CLOCK_S = 2.0  # past the second in which slurmd revoked the last run's credential


def _node_states() -> str:
    """The partition's node states as sinfo prints them ("idle", "comp" while a job completes, ...)."""
    return subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%t"], capture_output=True, text=True).stdout


def task_log(run_dir: Path, job_id: str, rank: int, ext: str = "out") -> str:
    return (run_dir / "slurm" / job_id / f"{job_id}_{rank}_log.{ext}").read_text()


def job_logs(run_dir: Path, job_id: str, tail: int = 3000) -> str:
    """The end of every task log of the job, for a failure message that says why it failed."""
    logs = sorted((run_dir / "slurm" / job_id).glob("*_log.*"))
    return "\n".join(f"--- {log.name}\n{log.read_text()[-tail:]}" for log in logs)


# ----------------------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def reference(cluster: None, synth_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-task run: the baseline every interrupted run must reproduce."""
    run_dir = tmp_path_factory.mktemp("slurm_ref") / "run"
    result = sslforge(*launch_args(synth_data, run_dir), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", result.stdout).group(1)  # type: ignore[union-attr]
    return {"run_dir": run_dir, "job_id": job_id, "stdout": result.stdout,
            "losses": {r["step"]: r["loss"] for r in train_records(run_dir)}}


def test_two_task_job_trains_to_completion_on_two_ranks(reference: dict) -> None:
    run_dir, job_id = reference["run_dir"], reference["job_id"]
    train = train_records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert {r["world_size"] for r in train} == {2}
    assert latest_step(run_dir) == STEPS
    assert job_state(job_id).state == "COMPLETED"
    for rank in (0, 1):  # one log pair per task, each from its own rank
        assert f"global_rank={rank}(2)" in task_log(run_dir, job_id, rank)
        assert (run_dir / "slurm" / job_id / f"{job_id}_{rank}_log.err").is_file()
    out = reference["stdout"]
    assert str(run_dir) in out and f"{run_dir}/slurm/{job_id}/{job_id}_0_log.out" in out


def test_jobs_shows_state_and_logs(reference: dict, tmp_path: Path) -> None:
    run_dir, job_id = reference["run_dir"], reference["job_id"]
    result = sslforge("jobs", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert re.search(rf"job {job_id}\s+COMPLETED", result.stdout)
    assert f"{run_dir}/slurm/{job_id}/" in result.stdout
    assert f"latest checkpoint: step_{STEPS:08d}" in result.stdout
    empty = sslforge("jobs", str(tmp_path))
    assert empty.returncode == 2 and "no SLURM jobs recorded" in empty.stderr


@pytest.mark.slow
def test_usr2_checkpoints_at_the_step_requeues_and_matches_the_uninterrupted_run(
        reference: dict, synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # No periodic checkpoint before the end: resuming mid-run proves the signal's checkpoint.
    job = Launch(launch_args(synth_data, run_dir, "train.ckpt_every_steps=1000"))
    wait_for(lambda: len(train_records(run_dir)) >= 8, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # what --signal=USR2@30 sends
    start_requeued_now(job.job_id)
    code, err = job.finish()
    assert code == 0, err[-3000:] + job_logs(run_dir, job.job_id)

    stopped = re.search(r"rank 0 stopped with a checkpoint at step (\d+)", task_log(run_dir, job.job_id, 0))
    assert stopped, task_log(run_dir, job.job_id, 0)
    assert 8 <= int(stopped.group(1)) < STEPS
    assert f"Requeued job {job.job_id}" in task_log(run_dir, job.job_id, 0)
    assert "rank 0/2 starting (restart 1)" in task_log(run_dir, job.job_id, 0)
    assert job_state(job.job_id).state == "COMPLETED" and job_state(job.job_id).restarts == 1
    train = train_records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # no step lost or repeated
    for r in train:
        assert r["loss"] == pytest.approx(reference["losses"][r["step"]], abs=1e-6), r["step"]


@pytest.mark.slow
def test_scontrol_requeue_resumes_from_the_latest_checkpoint(
        reference: dict, synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = Launch(launch_args(synth_data, run_dir, "train.ckpt_every_steps=5"))
    wait_for(lambda: len(train_records(run_dir)) >= 12, "training to pass a checkpoint")
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    start_requeued_now(job.job_id)
    resumed_from = latest_step(run_dir)  # the job is pending: nothing writes checkpoints now
    code, err = job.finish()
    assert code == 0, err[-3000:] + job_logs(run_dir, job.job_id)

    assert resumed_from >= 10
    steps = [r["step"] for r in train_records(run_dir)]
    second = len(steps) - 1 - steps[::-1].index(resumed_from + 1)  # where the requeued run begins
    assert steps[second:] == list(range(resumed_from + 1, STEPS + 1))  # not from step 0, to the end
    assert set(steps[:second]) >= set(range(1, resumed_from + 1))
    for r in train_records(run_dir)[second:]:  # the checkpoint restored the exact state
        assert r["loss"] == pytest.approx(reference["losses"][r["step"]], abs=1e-6), r["step"]
    assert job_state(job.job_id).restarts == 1 and latest_step(run_dir) == STEPS


def test_requeues_stop_at_max_requeues(reference: dict, synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = Launch(launch_args(synth_data, run_dir, "slurm.max_requeues=0", "train.ckpt_every_steps=1000"))
    wait_for(lambda: len(train_records(run_dir)) >= 4, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    code, _ = job.finish()
    assert code != 0
    state = job_state(job.job_id)
    assert state.state == "FAILED" and state.restarts == 0
    assert "not requeuing" in task_log(run_dir, job.job_id, 0)
    assert 4 <= latest_step(run_dir) < STEPS  # it still saved its work on the signal


def test_a_real_error_fails_the_job_without_requeue(reference: dict, synth_data: dict, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(synth_data["train"], shards)
    run_dir = tmp_path / "run"
    job = Launch(launch_args({"train": str(shards)}, run_dir))
    shutil.rmtree(shards)  # after the launch's checks, before the job reads it
    code, _ = job.finish()
    assert code != 0
    state = job_state(job.job_id)
    assert state.state == "FAILED" and state.restarts == 0


def _task_pid(job_id: str, rank: int) -> int:
    """The process of task `rank` (not one of its data workers, which share its environment)."""
    for proc in job_processes(job_id):
        try:
            if (proc.environ().get("SLURM_PROCID") == str(rank) and "submitit.core._submit" in " ".join(proc.cmdline())
                    and proc.parent().environ().get("SLURM_PROCID") is None):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no task {rank} of job {job_id}")


@pytest.mark.parametrize("fault", ["raise", "sigkill"])
def test_a_failed_rank_fails_the_job_at_once(cluster: None, synth_data: dict, tmp_path: Path, fault: str) -> None:
    """One rank of a 2-task job raises, or is killed: the job ends FAILED within a minute, not
    requeued, not holding its node until the time limit (10 min here)."""
    run_dir, mark = tmp_path / "run", tmp_path / "fault-fired"
    env = fault_env("raise", 1, mark, step="4") if fault == "raise" else None
    job = Launch(launch_args(synth_data, run_dir), env)
    try:
        if fault == "raise":
            wait_for(mark.exists, "the fault")
            failed_at = mark.stat().st_mtime
        else:
            wait_for(lambda: len(train_records(run_dir)) >= 4, "training to start")
            os.kill(_task_pid(job.job_id, 1), signal.SIGKILL)
            failed_at = time.time()
        wait_for(lambda: job_state(job.job_id).finished, "the job to end", timeout=60)
        ended_in = time.time() - failed_at
    finally:
        if not job_state(job.job_id).finished:
            subprocess.run(["scancel", job.job_id])
        code, err = job.finish()
    state = job_state(job.job_id)
    assert state.state == "FAILED" and state.restarts == 0, (state, err[-3000:])
    assert code != 0 and ended_in < 60
    assert len(train_records(run_dir)) < STEPS


@pytest.mark.slow
def test_a_lost_rank_requeues_the_job_from_its_checkpoint(reference: dict, synth_data: dict, tmp_path: Path) -> None:
    """Rank 1 freezes (SIGSTOP: to its peers, a node that died). Rank 0's watchdog notices the
    silence within engine.peer_timeout_s and requeues the job, rather than failing it or waiting
    in its collective to the time limit; the job resumes from the latest checkpoint and ends
    with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    job = Launch(launch_args(synth_data, run_dir, "train.ckpt_every_steps=5", "engine.peer_timeout_s=10"))
    try:
        wait_for(lambda: len(train_records(run_dir)) >= 12, "training to pass a checkpoint")
        os.kill(_task_pid(job.job_id, 1), signal.SIGSTOP)
        frozen_at = time.time()
        state = start_requeued_now(job.job_id)
        requeued_in = time.time() - frozen_at
        resumed_from = latest_step(run_dir)  # the job is pending: nothing writes checkpoints now
    finally:
        code, err = job.finish()
    assert code == 0, err[-3000:] + job_logs(run_dir, job.job_id)
    assert state.restarts == 1 and requeued_in < 60
    assert "requeued job" in task_log(run_dir, job.job_id, 0) and "after a lost rank" in task_log(run_dir, job.job_id, 0)
    steps = [r["step"] for r in train_records(run_dir)]
    second = len(steps) - 1 - steps[::-1].index(resumed_from + 1)  # where the requeued run begins
    assert steps[second:] == list(range(resumed_from + 1, STEPS + 1))
    for r in train_records(run_dir)[second:]:
        assert r["loss"] == pytest.approx(reference["losses"][r["step"]], abs=1e-6), r["step"]
    assert job_state(job.job_id).state == "COMPLETED" and latest_step(run_dir) == STEPS


# ----------------------------------------------------------------------------------- no submission


def test_dry_run_prints_the_script_it_would_submit(cluster: None, synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = sslforge("launch", "simclr_synth", f"data.train={synth_data['train']}", f"run_dir={run_dir}",
                      "slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.partition=cpu", "slurm.time=1-00:00:00",
                      "slurm.account=acme", "slurm.qos=high", "slurm.constraint=a100", "slurm.mem=200G",
                      "slurm.cpus_per_task=8", "slurm.signal_delay_s=300", "--slurm", "--dry-run")
    assert result.returncode == 0, result.stderr
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=1-00:00:00",
                 "--partition=cpu", "--account=acme", "--qos=high", "--constraint=a100", "--mem=200G",
                 "--cpus-per-task=8", "--signal=USR2@300", "--requeue"):
        assert f"#SBATCH {line}\n" in result.stdout, line
    assert f"srun --unbuffered --output {run_dir}/slurm/%j/%j_%t_log.out" in result.stdout
    assert " --kill-on-bad-exit=1 " in result.stdout  # a failed task ends the job, not the time limit
    assert not run_dir.exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_dry_run_matches_the_submitted_script(reference: dict, synth_data: dict) -> None:
    run_dir, job_id = reference["run_dir"], reference["job_id"]
    result = sslforge(*launch_args(synth_data, run_dir), "--dry-run")
    assert result.returncode == 0, result.stderr
    submitted = (run_dir / "slurm" / job_id / f"{job_id}_submission.sh").read_text()
    assert result.stdout == submitted


def _no_slurm_env(tmp_path: Path) -> dict:
    bare = tmp_path / "bin"
    bare.mkdir()
    return {**os.environ, "PATH": str(bare)}


@pytest.mark.parametrize("case, overrides, message", [
    ("partition", ["slurm.partition=gpu-nope"], "unknown partition slurm.partition='gpu-nope'; this cluster has: cpu"),
    ("time", ["slurm.time=00:02:00", "slurm.signal_delay_s=120"], "slurm.time=00:02:00 (120 s) is shorter than "
     "slurm.signal_delay_s=120"),
    ("run_dir", [], "is not writable"),
    ("no_slurm", [], "no SLURM on this machine"),
])
def test_bad_input_is_one_clear_line_and_submits_nothing(cluster: None, synth_data: dict, tmp_path: Path,
                                                         case: str, overrides: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    env = None
    if case == "run_dir":
        (tmp_path / "file").write_text("")
        run_dir = tmp_path / "file" / "run"  # under a regular file: cannot exist
    if case == "no_slurm":
        env = _no_slurm_env(tmp_path)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = sslforge(*launch_args(synth_data, run_dir, *overrides), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("sslforge: error:") and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert not (run_dir / "jobs.json").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
