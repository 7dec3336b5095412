"""Checkpoint/resume and non-finite handling of the loop, on 2 gloo ranks with fixed batches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslforge import distributed
from sslforge.launcher.env import init_distributed
from sslforge.trainer.loop import NonFiniteLossError, Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import (FixedLoader, assert_resumed_losses_equal, global_batch, local_slice,
                                    tiny_config)

BATCH, STEPS_PER_EPOCH = 8, 3


def _loader(world: int, poison_step: int | None = None) -> FixedLoader:
    batches = []
    for i in range(STEPS_PER_EPOCH):
        batch = local_slice(global_batch(BATCH, seed=i), distributed.rank(), world)
        if i == poison_step and distributed.rank() == 1:
            batch["views"][0][0, 0, 0, 0] = float("nan")  # only one rank sees it
        batches.append(batch)
    return FixedLoader(batches)


def _train(run_dir: str, world: int, stop_at: int | None, *overrides: str) -> int:
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", "train.steps=7", "train.log_every_steps=1",
                      "train.ckpt_every_steps=100", "train.keep_last=2", "optim.warmup_epochs=1", *overrides)
    env = init_distributed("gloo")
    return Trainer(cfg, env, loader=_loader(world)).fit(stop_at_step=stop_at).step


def test_resume_continues_exactly(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_ranks(_train, 2, str(whole), 2, None) == [7, 7]
    assert run_ranks(_train, 2, str(split), 2, 4) == [4, 4]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000004"
    assert run_ranks(_train, 2, str(split), 2, None) == [7, 7]
    assert_resumed_losses_equal(whole, split, 7)
    kept = sorted(p.name for p in (split / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000004", "step_00000007"]  # keep_last=2, no temporary left


def _train_poisoned(run_dir: str, world: int, policy: str) -> dict:
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", "train.steps=3", "train.log_every_steps=1",
                      f"train.on_nonfinite={policy}")
    env = init_distributed("gloo")
    trainer = Trainer(cfg, env, loader=_loader(world, poison_step=1))
    try:
        trainer.fit()
    except NonFiniteLossError as exc:
        return {"error": str(exc)}
    finite = all(torch.isfinite(p).all() for p in trainer.method.parameters())
    return {"error": None, "finite": bool(finite)}


def test_nonfinite_loss_on_one_rank_is_skipped_by_all(tmp_path: Path) -> None:
    results = run_ranks(_train_poisoned, 2, str(tmp_path), 2, "skip")
    assert all(r["error"] is None and r["finite"] for r in results)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["nonfinite_skipped"] for r in records if "nonfinite_skipped" in r}
    assert skipped == {1: False, 2: True, 3: False}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"


def test_nonfinite_loss_stops_every_rank_without_checkpoint(tmp_path: Path) -> None:
    results = run_ranks(_train_poisoned, 2, str(tmp_path), 2, "stop")
    assert all(r["error"] and "non-finite at step 1" in r["error"] for r in results)
    assert not (tmp_path / "checkpoints").exists()


def _train_on_shards(run_dir: str, train: str, stop_at: int | None) -> int:
    cfg = tiny_config(run_dir, f"data.train={train}", "optim.batch_size=64", "data.num_workers=2",
                      "train.steps=10", "train.log_every_steps=1", "data.shuffle_buffer=50")
    env = init_distributed("gloo")
    trainer = Trainer(cfg, env)
    assert len(trainer.loader) == 8  # 512 samples / (2 ranks x 2 workers x 32) = 4 batches per worker
    return trainer.fit(stop_at_step=stop_at).step


@pytest.mark.slow
def test_resume_mid_epoch_with_shard_stream(tmp_path: Path, synth_data: dict) -> None:
    """Data position is restored: the resumed run sees the same batches (same losses) across
    the epoch boundary at step 8, with 2 workers per rank."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_ranks(_train_on_shards, 2, str(whole), synth_data["train"], None) == [10, 10]
    assert run_ranks(_train_on_shards, 2, str(split), synth_data["train"], 5) == [5, 5]
    assert run_ranks(_train_on_shards, 2, str(split), synth_data["train"], None) == [10, 10]
    assert_resumed_losses_equal(whole, split, 10)
