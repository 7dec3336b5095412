"""MoCo v2 and v3: one step on 2 gloo ranks with B/2 each equals 1 rank with B (loss, gradients,
updated parameters, the key encoder after its momentum update, the queue and its pointer); shuffle
BN's shuffle and un-shuffle put every key back with its sample; the queue takes the keys of all
ranks in global order at its pointer and wraps; the momentum schedules and updates; resume of a
MoCo v2 run mid-way equals the uninterrupted run, queue and key encoder included.

The InfoNCE loss itself is checked against hand-computed values in the losses' tests.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.config import ConfigError
from sslforge.launcher.env import init_distributed
from sslforge.methods import build_method
from sslforge.methods.moco_v2 import own_rows, shuffle_across_ranks, unshuffle_across_ranks
from sslforge.trainer.loop import Trainer
from tests.dist_harness import run_ranks
from tests.test_trainer_resume import BATCH, _loader
from tests.trainer_fixtures import (assert_resumed_losses_equal, assert_tensors_close,
                                    assert_two_ranks_equal_one, global_batch, local_slice, one_step_of,
                                    tiny_config, view_sizes)

# Tiny heads (TINY: 32 -> 16), a queue of two global batches of 8. SGD / LARS as published (Adam's
# first step is sign(g), which turns float rounding in near-zero gradients into differences of
# size lr), with learning rates large enough for the step to move the key encoder visibly. MoCo v2
# with SyncBN instead of shuffle BN: only then do N ranks equal one by design.
V2 = ("moco_v2_synth", ["method.queue_size=16", "optim.name=sgd", "optim.base_lr=1.0",
                        "method.shuffle_bn=false", "model.sync_bn=true", "method.momentum=0.9"])
V3 = ("moco_v3_synth", ["method.pred_hidden_dim=32", "optim.name=lars", "optim.base_lr=100",
                        "method.base_momentum=0.9"])
MOMENTUM = 0.9  # MoCo v2's constant, MoCo v3's schedule at step 0: far enough from 1 to see the update
ATOL = 1e-5


@pytest.mark.parametrize("recipe, overrides", [V2, V3],
                         ids=["moco_v2", "moco_v3"])
def test_one_step_two_ranks_equal_one_rank(tmp_path, recipe: str, overrides: list[str]) -> None:
    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), recipe, *overrides)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), recipe, *overrides)
    assert_two_ranks_equal_one(single, pair, ATOL)  # key encoder, queue and pointer included
    _assert_momentum_average(single)
    if recipe == V2[0]:
        assert int(single["buffers"]["queue_ptr"]) == 8  # one global batch went in


def _assert_momentum_average(out: dict[str, Any]) -> None:
    """After step 0 the key (momentum) encoder, a copy of the query one, is m * before +
    (1 - m) * after; it has no gradient, and the predictor has no momentum copy."""
    copies = [n for n in out["params"] if n.startswith("momentum_")]
    assert copies and not any("predictor" in n for n in copies)
    moved = 0.0
    for name in copies:
        online = name.removeprefix("momentum_")
        after = out["params"][online]
        before = after - out["update"][online]
        expected = MOMENTUM * before + (1 - MOMENTUM) * after
        assert name not in out["grads"], name
        assert torch.allclose(out["params"][name], expected, atol=1e-7, rtol=1e-6), name
        moved = max(moved, float((expected - before).abs().max()))
    assert moved > 1e-4  # the check tells the average from an unchanged copy


def _shuffle_round_trip(batch: int) -> dict[str, torch.Tensor]:
    """Each rank's samples are numbered by their global index; every rank seeds its generator
    differently, so only the broadcast can make the permutations agree."""
    torch.manual_seed(100 + distributed.rank())
    b = batch // distributed.world_size()
    ids = own_rows(torch.arange(batch, dtype=torch.float32), b)
    x = torch.stack([ids, -ids], dim=1)  # (b, 2) "images"
    shuffled, order = shuffle_across_ranks(x)
    outputs = shuffled * 10  # a per-sample "key encoder"
    restored = unshuffle_across_ranks(outputs, order)
    return {"ids": ids, "shuffled": shuffled[:, 0], "order": order, "restored": restored}


def test_shuffle_and_unshuffle_restore_every_key_to_its_sample() -> None:
    batch = 16
    ranks = run_ranks(_shuffle_round_trip, 2, batch)
    order = ranks[0]["order"]
    assert torch.equal(ranks[1]["order"], order)  # rank 0's permutation, broadcast
    assert sorted(order.tolist()) == list(range(batch))
    for r, out in enumerate(ranks):
        assert torch.equal(out["shuffled"], order[r * 8:(r + 1) * 8].float())  # its share of the order
        assert not torch.equal(out["shuffled"].sort().values, out["ids"])  # samples of the other rank
        expected = torch.stack([torch.arange(batch), -torch.arange(batch)], dim=1).float() * 10
        assert torch.equal(out["restored"], expected)  # every key back at its sample, global order


def _queue_after_steps(run_dir: str, steps: int) -> dict[str, Any]:
    """MoCo v2 on 2 ranks in eval mode (batch norm from running statistics, so a key depends on
    its own sample only): the queue and pointer after each step, and the keys computed on this
    rank from the whole global batch."""
    cfg = tiny_config(run_dir, "optim.batch_size=8", "method.queue_size=16", "method.shuffle_bn=true",
                      "model.sync_bn=false", recipe="moco_v2_synth")
    init_distributed("gloo")
    torch.manual_seed(0)  # the same initial weights on both ranks, as the Trainer's seeding
    method = build_method(cfg).eval()
    queues, pointers, expected = [], [], []
    schedules = method.schedules(steps, steps)
    for step in range(steps):
        method.scheduled = {name: values[step] for name, values in schedules.items()}  # as the trainer
        batch = global_batch(8, view_sizes(cfg), seed=step)
        local = local_slice(batch, distributed.rank(), distributed.world_size())
        with torch.no_grad():
            keys = method.momentum_encode(batch["views"][1])
            method.training_step(local, step)
            method.on_after_optimizer_step(step, steps)
        expected.append(F.normalize(keys, dim=1))
        queues.append(method.queue.clone())
        pointers.append(int(method.queue_ptr))
    return {"queues": queues, "pointers": pointers, "expected": expected}


def test_queue_takes_the_keys_of_all_ranks_in_global_order_and_wraps(tmp_path) -> None:
    ranks = run_ranks(_queue_after_steps, 2, str(tmp_path), 3)
    for out in ranks:
        assert out["pointers"] == [8, 0, 8]  # K = 2 global batches: the third step wraps around
        queues, keys = out["queues"], out["expected"]
        assert torch.allclose(queues[0][:8], keys[0], atol=1e-6)
        assert torch.allclose(queues[1][8:], keys[1], atol=1e-6)
        assert torch.allclose(queues[1][:8], keys[0], atol=1e-6)
        assert torch.allclose(queues[2][:8], keys[2], atol=1e-6)  # the oldest batch replaced
        assert torch.allclose(queues[2][8:], keys[1], atol=1e-6)
    assert torch.equal(ranks[0]["queues"][2], ranks[1]["queues"][2])


def test_queue_size_must_be_a_multiple_of_the_global_batch(tmp_path) -> None:
    """Refused when the recipe is loaded, before any process starts."""
    with pytest.raises(ConfigError, match=r"method.queue_size=64 must be a positive multiple of the "
                                          r"global batch optim.batch_size=24"):
        tiny_config(tmp_path, "optim.batch_size=24", "method.queue_size=64", recipe="moco_v2_synth")


def _cosine_momentum(base: float, t: int, total: int) -> float:
    """MoCo v3's `adjust_moco_momentum` (and BYOL's): 1 - (1 - m0)(cos(pi t / T) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * t / total) + 1) / 2


def test_moco_v3_momentum_schedule_matches_the_paper(tmp_path) -> None:
    cfg = tiny_config(tmp_path, *V3[1], recipe=V3[0])
    total = 1000
    m = build_method(cfg).schedules(total, 100)["momentum"]
    assert len(m) == total
    for t in (0, total // 2, total - 1):
        assert m[t] == pytest.approx(_cosine_momentum(cfg.method.base_momentum, t, total), abs=1e-12), t
    assert m[0] == pytest.approx(cfg.method.base_momentum) and m[-1] < 1.0


def _train_v2(run_dir: str, world: int, stop_at: int | None) -> dict[str, Any]:
    """MoCo v2 as published (shuffle BN, per-rank BN) for 7 steps of 3 fixed batches; a queue of
    3 global batches, so it wraps during the run."""
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", "train.steps=7", "train.log_every_steps=1",
                      "train.ckpt_every_steps=100", "train.keep_last=2", "optim.warmup_epochs=1",
                      f"method.queue_size={3 * BATCH}", "method.shuffle_bn=true", "model.sync_bn=false",
                      recipe="moco_v2_synth")
    env = init_distributed("gloo")
    trainer = Trainer(cfg, env, loader=_loader(world))
    step = trainer.fit(stop_at_step=stop_at).step
    return {"step": step, "params": {n: p.detach().clone() for n, p in trainer.method.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in trainer.method.named_buffers()}}


def test_moco_v2_resume_mid_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Queue, pointer, key encoder and the shuffle's random permutations continue exactly.
    Checkpoints hold rank 0's module (DeepSpeed's), so with per-rank batch norm only rank 0's
    running statistics survive a resume, as in the official code; they are compared on rank 0."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    expected = run_ranks(_train_v2, 2, str(whole), 2, None)
    assert [r["step"] for r in run_ranks(_train_v2, 2, str(split), 2, 4)] == [4, 4]
    resumed = run_ranks(_train_v2, 2, str(split), 2, None)
    assert [r["step"] for r in resumed] == [7, 7]
    assert_resumed_losses_equal(whole, split, 7)
    for rank in (0, 1):
        assert_tensors_close(resumed[rank]["params"], expected[rank]["params"], f"rank {rank} parameter", ATOL)
    assert_tensors_close(resumed[0]["buffers"], expected[0]["buffers"], "buffer", ATOL)
    for name in ("queue", "queue_ptr"):
        assert torch.equal(resumed[1]["buffers"][name], resumed[0]["buffers"][name]), name
    assert int(expected[0]["buffers"]["queue_ptr"]) == (7 * BATCH) % (3 * BATCH)

