"""Entry point of one rank: `python -m sslforge.launcher.worker RUN_DIR/config.yaml`."""
from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, stopped at once without a checkpoint


def run_rank(cfg: DictConfig) -> int:
    """Train as this process's rank; returns the exit status."""
    from sslforge.launcher.env import launched_rank
    from sslforge.trainer.checkpoint import CheckpointError
    from sslforge.trainer.loop import NonFiniteLossError, run

    try:
        result = run(cfg)
    except (NonFiniteLossError, CheckpointError) as exc:  # one line: the cause is named, no traceback
        print(f"sslforge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sslforge: interrupted (Ctrl-C twice): stopped at once; the steps since the last checkpoint "
              "are lost, and the same command resumes from that checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.preempted:
        if launched_rank() == 0:  # one line for the job, not one per rank
            print(f"sslforge: stopped at step {result.step} with a checkpoint in {cfg.run_dir}; "
                  "run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    if result.warning and launched_rank() == 0:  # finished, but not every step trained: say so last
        print(f"sslforge: warning: finished at step {result.step}, but {result.warning}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from sslforge.trainer import preemption

    # `kill -USR1 PID` prints every thread's Python stack, even with the GIL held in native code.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    preemption.install_handlers()  # first: a stop asked for while torch imports must not kill the rank
    from sslforge.config import load_resolved

    args = argv if argv is not None else sys.argv[1:]
    return run_rank(load_resolved(Path(args[0])))


if __name__ == "__main__":
    sys.exit(main())
