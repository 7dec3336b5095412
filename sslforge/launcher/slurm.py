"""`sslforge launch --slurm` and `sslforge jobs`: submit a run through submitit, watch it.

Everything that would make a job fail after hours in the queue is checked here first (SLURM
present, partition known, time limit longer than the checkpoint signal's delay, run directory
writable, batch divisible by the ranks) and reported as one `SlurmError` line. The job itself is
`slurm_job.SlurmTrainTask`; the run directory keeps the resolved config, `jobs.json` (every job
submitted for the run) and submitit's per-task logs under `slurm/JOB_ID/`. `sslforge jobs`
prints the jobs (`job_lines`) beside the run's local launches (`local_jobs`).
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sslforge.config import check_buildable
from sslforge.launcher import slurm_state
from sslforge.resume_guard import check_resume, save_run

# SLURM checks signal times about once a minute, so `--signal=USR2@D` may come up to 60 s late
# or early; the job must run at least this much longer than the delay to get its signal at all.
SIGNAL_MARGIN_S = 60
JOBS_FILE = "jobs.json"


class SlurmError(RuntimeError):
    """Bad input for a SLURM launch, found before anything is submitted; one line."""


# ---------------------------------------------------------------------------- checks


def time_limit_s(text: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (as sbatch reads them)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise SlurmError(f"slurm.time={text!r} is not a SLURM time limit (e.g. 72:00:00 or 3-00:00:00)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:
        hours, minutes, seconds = a, b, c
    else:
        hours, minutes, seconds = 0, a, b or 0
    return (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds  # type: ignore[operator]


def tasks_per_node(cfg: DictConfig) -> int:
    """One task (rank) per GPU; `slurm.tasks_per_node` for CPU ranks or to override."""
    s = cfg.slurm
    if s.tasks_per_node is not None:
        return int(s.tasks_per_node)
    return int(s.gpus_per_node) if s.gpus_per_node > 0 else 1


def _check_config(cfg: DictConfig) -> None:
    s = cfg.slurm
    for key in ("nodes", "cpus_per_task"):
        if s[key] < 1:
            raise SlurmError(f"slurm.{key}={s[key]} must be >= 1")
    if s.gpus_per_node < 0 or tasks_per_node(cfg) < 1:
        raise SlurmError("slurm.gpus_per_node must be >= 0 and slurm.tasks_per_node >= 1")
    if s.signal_delay_s < 1 or s.max_requeues < 0:
        raise SlurmError("slurm.signal_delay_s must be >= 1 and slurm.max_requeues >= 0")
    limit = time_limit_s(s.time)
    if limit < s.signal_delay_s + SIGNAL_MARGIN_S:
        raise SlurmError(f"slurm.time={s.time} ({limit} s) is shorter than slurm.signal_delay_s="
                         f"{s.signal_delay_s} plus {SIGNAL_MARGIN_S} s of SLURM's signal slack: the job "
                         "could be killed before its checkpoint signal; raise slurm.time or lower "
                         "slurm.signal_delay_s")
    world = s.nodes * tasks_per_node(cfg)
    if cfg.optim.batch_size % world:
        raise SlurmError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by the {world} ranks "
                         f"(slurm.nodes={s.nodes} x {tasks_per_node(cfg)} tasks per node)")


def _check_cluster(cfg: DictConfig, required: bool) -> None:
    """SLURM's commands are here, the controller answers and knows the partition. A dry run
    checks what it can: off-cluster, or with the controller down, it still prints the script."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        if required:
            raise SlurmError("no SLURM on this machine (sbatch/sinfo not found on PATH): submit from a "
                             "cluster login node; scripts/ensure_slurm.sh starts a one-node test cluster")
        return
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if required:
            raise SlurmError("cannot reach the SLURM controller (sinfo: "
                             f"{out.stderr.strip() or out.returncode})")
        return
    partition = cfg.slurm.partition
    if partition:
        known = sorted(set(out.stdout.split()))
        if partition not in known:
            raise SlurmError(f"unknown partition slurm.partition={partition!r}; this cluster has: "
                             f"{', '.join(known) or 'none'}")


def _check_run_dir(run_dir: Path, create: bool) -> None:
    """Creating and writing is the only honest test (root passes `os.access` on read-only mounts)."""
    if not create:
        existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise SlurmError(f"run_dir {run_dir} is not writable ({existing} is not a writable directory)")
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise SlurmError(f"run_dir {run_dir} is not writable: {exc.strerror or exc}") from None


def _check_data(cfg: DictConfig) -> None:
    from sslforge.data_pipeline.shards import expand_shards

    for spec in (cfg.data.train, cfg.data.val, cfg.data.knn_train):
        if spec:
            expand_shards(spec)


def _check_no_live_job(run_dir: Path) -> None:
    """Two jobs writing one run directory would interleave checkpoints."""
    for entry in _recorded_jobs(run_dir):
        state = slurm_state.job_state(entry["job_id"])
        if state.state not in ("UNKNOWN",) and not state.finished:
            raise SlurmError(f"run_dir {run_dir} already has job {state.job_id} {state.state}; wait for it "
                             f"or cancel it (scancel {state.job_id}) before launching again")


# ---------------------------------------------------------------------------- sbatch


def sbatch_parameters(cfg: DictConfig) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch's own names) for this run."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "job_name": cfg.name,
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": s.cpus_per_task,
        # submitit counts timeouts in minutes; sbatch gets the limit exactly as written.
        "time": math.ceil(time_limit_s(s.time) / 60),
        "signal_delay_s": s.signal_delay_s,
        # Each rank's intra-op threads use its own CPUs, not the whole node's.
        "setup": ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"],
        # Requeue even where the cluster's JobRequeue default is 0.
        "additional_parameters": {"time": str(s.time), "requeue": True},
        # A task that fails or is killed ends the step, so the job ends FAILED at once instead of
        # holding its nodes (the ranks' watchdog ends the others too; this covers a stuck one).
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if s[key]:
            params[key] = str(s[key])
    return params


def render_sbatch(folder: Path, params: dict[str, Any]) -> str:
    """The script `SlurmExecutor` writes for these parameters (its own template, same command)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


# ---------------------------------------------------------------------------- launch / status


def _absolute_run_dir(cfg: DictConfig) -> DictConfig:
    """The job may start in another directory; a relative run_dir must mean the same place."""
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(Path(cfg.run_dir).expanduser().absolute())
    return cfg


def _recorded_jobs(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / JOBS_FILE
    return json.loads(path.read_text())["jobs"] if path.is_file() else []


def _record_job(run_dir: Path, entry: dict[str, Any]) -> None:
    path = run_dir / JOBS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"jobs": [*_recorded_jobs(run_dir), entry]}, indent=2) + "\n")
    tmp.replace(path)


def _log_paths(folder: str, job_id: str, task: int) -> tuple[Path, Path]:
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=task)
    return paths.stdout, paths.stderr


def launch(cfg: DictConfig, *, dry_run: bool = False, wait: bool = False) -> int:
    """Submit `cfg` as one SLURM job (nodes x tasks ranks); 0, or the job's status with `wait`."""
    import submitit

    from sslforge.launcher.slurm_job import SlurmTrainTask

    cfg = _absolute_run_dir(cfg)
    run_dir = Path(cfg.run_dir)
    folder = run_dir / "slurm" / "%j"
    _check_config(cfg)
    check_buildable(cfg)
    check_resume(cfg)  # before anything is written, dry run included
    params = sbatch_parameters(cfg)
    if dry_run:
        _check_cluster(cfg, required=False)
        _check_run_dir(run_dir, create=False)
        print(render_sbatch(folder, params), end="")
        print("sslforge: dry run, nothing submitted", file=sys.stderr)
        return 0
    _check_cluster(cfg, required=True)
    _check_run_dir(run_dir, create=True)
    _check_data(cfg)
    _check_no_live_job(run_dir)

    config_path = save_run(cfg)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**params)
    try:
        job = executor.submit(SlurmTrainTask(str(config_path), cfg.slurm.max_requeues))
    except submitit.core.utils.FailedJobError as exc:
        detail = [line for line in str(exc).splitlines() if line.strip()]
        raise SlurmError(f"sbatch refused the job: {detail[-1] if detail else exc}") from None
    ntasks = cfg.slurm.nodes * tasks_per_node(cfg)
    _record_job(run_dir, {"job_id": job.job_id, "submitted": dt.datetime.now().isoformat(timespec="seconds"),
                          "tasks": ntasks, "folder": str(folder)})
    out0, err0 = _log_paths(str(folder), job.job_id, 0)
    print(f"submitted SLURM job {job.job_id}: {cfg.slurm.nodes} node(s) x {tasks_per_node(cfg)} task(s), "
          f"partition {cfg.slurm.partition or '(default)'}, time {cfg.slurm.time}")
    print(f"run dir: {run_dir}")
    print(f"logs:    {out0.parent}/{job.job_id}_<rank>_log.out|err (rank 0: {out0}, {err0})")
    print(f"watch:   sslforge jobs {run_dir}    cancel: scancel {job.job_id}")
    sys.stdout.flush()
    if not wait:
        return 0
    try:
        final = slurm_state.wait(job.job_id, report=_report)
    except KeyboardInterrupt:
        print(f"sslforge: stopped waiting; job {job.job_id} keeps running (scancel {job.job_id} cancels it)",
              file=sys.stderr)
        return 130
    return final.exit_status


def _report(state: slurm_state.JobState) -> None:
    print(f"job {state.job_id}: {state.state}" + (f" (restarts {state.restarts})" if state.restarts else ""),
          file=sys.stderr, flush=True)


def job_lines(root: Path) -> list[str]:
    """What `sslforge jobs` prints for the SLURM jobs launched for the run at `root`: each job's
    state and where its logs are."""
    lines = []
    for entry in _recorded_jobs(root):
        state = slurm_state.job_state(entry["job_id"])
        line = f"job {state.job_id}  {state.state:<10} submitted {entry['submitted']}  tasks {entry['tasks']}"
        if state.restarts:
            line += f"  restarts {state.restarts}"
        if state.finished:
            line += f"  exit {state.exit_code}:{state.signal}"
        elif state.reason not in ("", "None"):
            line += f"  reason {state.reason}"
        out0, err0 = _log_paths(entry["folder"], state.job_id, 0)
        lines += [line, f"  logs: {out0.parent}/  (rank 0: {out0.name}, {err0.name})"]
    return lines
