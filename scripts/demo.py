"""`make demo`: built-in data -> SimCLR on 2 local ranks -> kNN top-1 against a random-init encoder.

Runs the real CLI commands a user would type, so what it prints is what they would see.
Settings can be changed by passing `key=value` overrides, e.g. `python scripts/demo.py train.epochs=2`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo_runs" / "data"
RUN = ROOT / "demo_runs" / "simclr_synth"


def sslforge(*args: str, capture: bool = False) -> str:
    """Run one CLI command as a user would; its output goes to the console (and is returned
    when `capture`, for the commands whose result the demo reads)."""
    cmd = [sys.executable, "-m", "sslforge.cli", *args]
    print("$ sslforge " + " ".join(args), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True)
    if capture:
        print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        sys.exit(f"demo: `sslforge {args[0]}` failed with exit status {result.returncode}")
    return result.stdout or ""


def main() -> None:
    started = time.time()
    if not (DATA / "val").is_dir():
        sslforge("data", "synth", str(DATA), "--train", "10000", "--val", "2000")
    shutil.rmtree(RUN, ignore_errors=True)  # a fresh run each time
    shards = [f"data.train={DATA / 'train'}", f"data.val={DATA / 'val'}", f"run_dir={RUN}"]
    sslforge("train", "simclr_synth", *shards, *sys.argv[1:], "--nproc", "2")
    knn = ["--train", str(DATA / "train"), "--val", str(DATA / "val")]
    trained = float(sslforge("eval", "knn", str(RUN), *knn, capture=True).split()[-1])
    random_init = float(sslforge("eval", "knn", str(RUN), *knn, "--random-init", capture=True).split()[-1])
    print()
    print(f"kNN top-1 (k=20, T=0.07) on the built-in val split, {time.time() - started:.0f}s in all:")
    print(f"  random-init encoder : {random_init:6.2f}%")
    print(f"  SimCLR, 2 ranks     : {trained:6.2f}%")
    print(f"run directory: {RUN} (config.yaml, metrics.jsonl, checkpoints/, wandb/)")
    (RUN / "demo_result.json").write_text(json.dumps({"random_init": random_init, "simclr": trained}))


if __name__ == "__main__":
    main()
