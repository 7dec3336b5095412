"""`sslforge train --nproc 2` end to end through torch.distributed.run, on the built-in data."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.test_cli import sslforge

SMALL = ["data.image_size=16", "optim.batch_size=16", "model.proj_hidden_dim=64", "data.num_workers=1",
         "logging.progress=false", "train.log_every_steps=1"]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rank_processes(launcher_pid: int) -> dict[int, psutil.Process]:
    """The rank processes under the launcher (not their data workers, which inherit RANK)."""
    ranks: dict[int, psutil.Process] = {}
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        rank = proc.environ().get("RANK")
        if rank is not None and proc.parent().environ().get("RANK") is None:
            ranks[int(rank)] = proc
    return ranks


def test_two_local_ranks_train_log_and_checkpoint(synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = sslforge("train", "simclr_synth", f"data.train={synth_data['train']}",
                      f"data.val={synth_data['val']}", f"run_dir={run_dir}", "train.steps=6",
                      "eval.every_epochs=0", "logging.wandb_mode=offline", *SMALL, "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["world_size"] == 2 for r in train)
    for key in ("lr", "samples_per_s", "data_wait_frac", "embedding_std", "skipped_samples"):
        assert key in train[-1], key
    assert any("knn_top1" in r for r in records)  # final evaluation
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run_dir / "config.yaml").is_file()
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert wandb_runs and any(p.suffix == ".wandb" for p in wandb_runs[0].iterdir())


def test_a_dead_rank_ends_the_job(synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sslforge.cli", "train", "simclr_synth", f"data.train={synth_data['train']}",
           f"run_dir={run_dir}", "train.steps=500", "eval.every_epochs=0", "data.val=null",
           "logging.wandb_mode=disabled", *SMALL, "--nproc", "2"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not _records(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert _records(run_dir), "training never started"
    workers = _rank_processes(launcher.pid)
    assert sorted(workers) == [0, 1]
    workers[1].kill()
    killed_at = time.time()
    try:
        code = launcher.wait(timeout=120)
    finally:
        launcher.kill()
    assert code != 0
    assert time.time() - killed_at < 120
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers.values())


def test_runs_as_one_rank_under_external_torchrun(synth_data: dict, tmp_path: Path) -> None:
    """`torchrun ... -m sslforge.cli train` : every process is one rank of the same job."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "sslforge.cli", "train", "simclr_synth", f"data.train={synth_data['train']}", "data.val=null",
           f"run_dir={run_dir}", "train.steps=2", "eval.every_epochs=0", "logging.wandb_mode=disabled", *SMALL]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["world_size"] for r in _records(run_dir) if "loss" in r] == [2, 2]
