"""SimCLR learns: on the built-in shapes, 2 local ranks, CPU, a few minutes, the trained
encoder's kNN top-1 beats the random-init encoder's by a clear margin."""
from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import sslforge

MARGIN = 20.0  # percentage points; measured: about 38% -> 90% (README)


def test_simclr_beats_random_init(pretrained_run: Path, shapes: dict[str, str]) -> None:
    run_dir, data = pretrained_run, shapes
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learned = [r["knn_top1"] for r in records if "knn_top1" in r and not r.get("random_init")][-1]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    baseline = sslforge("eval", "knn", str(run_dir), "--train", data["train"], "--val", data["val"],
                        "--random-init", timeout=600)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    random_init = float(baseline.stdout.split()[-1])
    print(f"kNN top-1: random init {random_init:.1f}%, SimCLR {learned:.1f}%")
    assert learned > random_init + MARGIN
