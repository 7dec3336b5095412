"""What runs inside a SLURM job: one task = one rank, preemption-proof through submitit.

How signals reach us (submitit 1.5, `core/job_environment.py`): the job is submitted with
`--signal=USR2@signal_delay_s`, which SLURM sends to every task of the step. submitit's own
handler would checkpoint and requeue right inside the signal handler, on rank 0 only, while the
other ranks keep training; that would save a state no rank agreed on. So the handler is swapped for
one that only calls `preemption.request_stop()`. The training loop agrees on the stop across
ranks, all ranks write the checkpoint at that exact step, `run` returns `preempted=True`, and only
then rank 0 hands over to submitit's handler, which calls `checkpoint()` below (re-dumping this
callable), runs `scontrol requeue` and exits. The requeued job loads the same callable and the
trainer resumes from `run_dir`'s latest checkpoint (`resume=auto`).

SIGTERM (scancel, `scontrol requeue` from outside, preemption with a grace time) also stops
the loop with a checkpoint (the trainer's own handler), but does not requeue: SLURM already
decides whether the job comes back. Every restart, ours or SLURM's, counts against
`slurm.max_requeues`, so a job that keeps being killed does not come back forever; a job that
fails with an exception is never requeued (it ends FAILED).

A rank that raises or dies ends the whole job within a minute, never at the time limit: srun
runs with `--kill-on-bad-exit=1` (`slurm.sbatch_parameters`), and each rank's watchdog
(`watchdog.py`) ends it when another rank failed or stopped responding, even while it waits in
a collective that would otherwise wait for `engine.collective_timeout_min`. A rank that raised
(or was killed, which its peers' collectives report) fails the job; a rank that went silent (its
node died or froze) is a machine's fault, not the run's: the job requeues itself, as SLURM's
node-failure handling would, and resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

import submitit
from submitit.core.job_environment import JobEnvironment
from submitit.core.logger import get_logger
from submitit.core.utils import DelayedSubmission

log = get_logger()  # submitit's: its lines and ours interleave in the same per-task log


def restart_count() -> int:
    """How many times SLURM has restarted this job (requeues of any origin, node failures)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


class SlurmTrainTask(submitit.helpers.Checkpointable):
    """The callable submitit pickles: trains the run whose resolved config is `config_path`.

    It holds only the config path, so a requeued job reads the same saved config and the
    state lives in the run directory's checkpoints, never in the pickle.
    """

    def __init__(self, config_path: str, max_requeues: int) -> None:
        self.config_path = config_path
        self.max_requeues = max_requeues

    def __call__(self) -> int:
        from sslforge.config import load_resolved
        from sslforge.launcher.worker import EXIT_PREEMPTED
        from sslforge.trainer import run

        if restart_count() > self.max_requeues:
            raise RuntimeError(f"job restarted {restart_count()} times, more than slurm.max_requeues="
                               f"{self.max_requeues}; not training again")
        # The trainer picks cuda:LOCAL_RANK among the node's GPUs, so every task keeps them all.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        usr_sig = JobEnvironment._usr_sig()
        requeue = _deferred_requeue(usr_sig)
        cfg = load_resolved(Path(self.config_path))
        log.info("rank %d/%d starting (restart %d) in %s", dist_env.rank, dist_env.world_size,
                 restart_count(), cfg.run_dir)
        result = run(cfg, on_peer_lost=self._requeue_after_peer_loss)
        if not result.preempted:
            return result.step
        log.warning("rank %d stopped with a checkpoint at step %d", dist_env.rank, result.step)
        if requeue.signalled and dist_env.rank == 0:
            requeue()  # checkpoint() + `scontrol requeue` + exit; raises when not requeued
        # Leave without a result pickle (SystemExit is not caught by submitit): the run is not
        # over. The other ranks got the signal too and exit 0, so srun's --kill-on-bad-exit
        # cannot kill rank 0 mid-requeue; stopped without a requeue (SIGTERM), say so: every
        # rank has written its part of the checkpoint before any of them exits.
        sys.exit(0 if requeue.signalled else EXIT_PREEMPTED)

    def _requeue_after_peer_loss(self, reason: str) -> None:
        """A rank's node died or froze (see launcher/watchdog.py): nothing is wrong with the run,
        so the job goes back to the queue (within `max_requeues`) and resumes from its latest
        checkpoint, as SLURM's own node-failure requeue would, minutes later. Each surviving
        rank asks; SLURM requeues the job once."""
        if restart_count() >= self.max_requeues:
            log.error("not requeuing after a lost rank: restarted %d times (slurm.max_requeues=%d)",
                      restart_count(), self.max_requeues)
            return
        job_id = JobEnvironment().job_id
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            log.warning("requeued job %s after a lost rank (%s)", job_id, reason)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[DelayedSubmission]:
        """Called by submitit on rank 0 after the training checkpoint is on disk: requeue as is,
        unless the job already came back `max_requeues` times (None tells submitit to stop)."""
        if restart_count() >= self.max_requeues:
            log.error("not requeuing: restarted %d times (slurm.max_requeues=%d)", restart_count(),
                      self.max_requeues)
            return None
        return super().checkpoint(*args, **kwargs)


class _DeferredRequeue:
    """Replaces submitit's preemption handler: records the signal and asks the loop to stop;
    calling it later runs submitit's handler, outside any signal context."""

    def __init__(self, submitit_handler: Callable[[int, Optional[FrameType]], None], signum: int) -> None:
        self.submitit_handler = submitit_handler
        self.signum = signum
        self.signalled = False

    def on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        from sslforge.trainer import preemption

        self.signalled = True
        preemption.request_stop()

    def __call__(self) -> None:
        self.submitit_handler(self.signum, None)


def _deferred_requeue(signum: int) -> _DeferredRequeue:
    installed = signal.getsignal(signum)
    if not callable(installed):
        raise RuntimeError(f"no submitit handler for {signal.Signals(signum).name}: run this through "
                           "submitit's SLURM executor (sslforge launch --slurm)")
    deferred = _DeferredRequeue(installed, signum)
    signal.signal(signum, deferred.on_signal)
    return deferred
