"""metrics.jsonl after a crash and a resume: one record of each kind per step (issue 7, item 8).

A run re-does the steps after its last checkpoint; their records used to be appended a second
time, so readers saw two losses for one step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sslforge import distributed
from sslforge.launcher.env import init_distributed
from sslforge.trainer.loop import Trainer
from sslforge.trainer.monitor import Monitor
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import FixedLoader, global_batch, local_slice, tiny_config

BATCH, STEPS, CKPT_EVERY, CRASH_AFTER = 8, 7, 2, 5


class CrashingLoader(FixedLoader):
    """Dies like a killed rank when asked for batch `crash_after + 1` of the run."""

    def __init__(self, batches: list[dict[str, Any]], crash_after: int | None) -> None:
        super().__init__(batches)
        self.crash_after, self.delivered = crash_after, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in super().__iter__():
            if self.delivered == self.crash_after:
                raise RuntimeError("node lost")
            self.delivered += 1
            yield batch


def _train(run_dir: str, crash_after: int | None) -> str:
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", f"train.steps={STEPS}", "train.log_every_steps=1",
                      f"train.ckpt_every_steps={CKPT_EVERY}")
    env = init_distributed("gloo")
    batches = [local_slice(global_batch(BATCH, seed=i), distributed.rank(), 1) for i in range(3)]
    try:
        Trainer(cfg, env, loader=CrashingLoader(batches, crash_after)).fit()
    except RuntimeError as exc:
        return str(exc)
    return "done"


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _crash_then_resume(run_dir: str) -> dict[str, Any]:
    """Both runs in one rank process (the process group is reused), as a requeued job would."""
    crashed = _train(run_dir, CRASH_AFTER)
    after_crash = [r["step"] for r in _records(Path(run_dir))]
    latest = (Path(run_dir) / "checkpoints" / "latest").read_text()
    return {"crashed": crashed, "after_crash": after_crash, "latest": latest, "resumed": _train(run_dir, None)}


def test_resume_after_a_crash_keeps_one_record_per_step(tmp_path: Path) -> None:
    [run] = run_ranks(_crash_then_resume, 1, str(tmp_path))
    assert run["crashed"] == "node lost" and run["resumed"] == "done"
    assert run["after_crash"] == list(range(1, CRASH_AFTER + 1))
    assert run["latest"] == "step_00000004"  # so step 5 is re-done
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == list(range(1, STEPS + 1))


def test_a_record_re_logged_at_the_resumed_step_replaces_its_earlier_copy(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    train = [{"step": s, "epoch": 0, "loss": 1.0 / s} for s in range(1, 7)]
    knn = {"step": 4, "epoch": 1, "knn_top1": 50.0}  # the trainer's epoch-end kNN at the checkpoint
    cli_eval = {"step": 4, "eval": "knn", "knn_top1": 40.0, "k": 20}  # `sslforge eval knn` of it
    lines = [json.dumps(r) for r in [*train[:4], knn, cli_eval, *train[4:]]] + ['{"step": 7, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))

    Monitor(cfg, tmp_path, total_steps=10, start_step=4, wandb_id=None, is_main=False)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines)  # only rank 0 writes

    monitor = Monitor(cfg, tmp_path, total_steps=10, start_step=4, wandb_id=None, is_main=True)
    assert _records(tmp_path) == [*train[:4], knn, cli_eval]  # steps after 4 and the cut line are gone
    monitor.log({"step": 4, "epoch": 1, "knn_top1": 60.0})  # the resumed run re-does that kNN
    monitor.log({"step": 5, "epoch": 1, "loss": 0.1})
    monitor.close()
    records = [{k: v for k, v in r.items() if k != "time"} for r in _records(tmp_path)]
    assert records == [*train[:4], cli_eval, {"step": 4, "epoch": 1, "knn_top1": 60.0},
                       {"step": 5, "epoch": 1, "loss": 0.1}]
