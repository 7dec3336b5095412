"""Local multi-process launch through torch.distributed.run (no home-made process manager).

torchrun's agent watches the ranks: when one dies, it stops the others and exits non-zero, so a
crashed rank never leaves the job hanging.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launch_local(config_path: Path, nproc: int) -> int:
    """Run `nproc` ranks of the worker on this machine; returns torchrun's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "sslforge.launcher.worker", str(config_path)]
    threads = str(max(1, (os.cpu_count() or 1) // nproc))  # share the cores, do not oversubscribe
    return subprocess.call(cmd, env={"OMP_NUM_THREADS": threads, **os.environ})
