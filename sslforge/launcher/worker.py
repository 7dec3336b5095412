"""Entry point of one rank: `python -m sslforge.launcher.worker RUN_DIR/config.yaml`."""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume


def run_rank(cfg: DictConfig) -> int:
    """Train as this process's rank; returns the exit status."""
    from sslforge.trainer.loop import NonFiniteLossError, run

    try:
        result = run(cfg)
    except NonFiniteLossError as exc:
        print(f"sslforge: error: {exc}", file=sys.stderr)
        return 1
    if result.preempted:
        print(f"sslforge: stopped at step {result.step} with a checkpoint in {cfg.run_dir}; "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    from sslforge.config import load_resolved

    args = argv if argv is not None else sys.argv[1:]
    return run_rank(load_resolved(Path(args[0])))


if __name__ == "__main__":
    sys.exit(main())
