"""DINO on the real trainer: 2 ranks equal 1, the published schedules, the frozen last layer, the
centre and teacher updates, and resume with the teacher and centre.

Expected values are DINO's formulas written out here (main_dino.py, utils.cosine_scheduler):
  teacher temperature at epoch e: linspace(warmup_teacher_temp, teacher_temp, E_w)[e], then teacher_temp
  teacher momentum at step t of T: 1 - (1 - m0) * (cos(pi t / T) + 1) / 2
  weight decay at step t of T: wd_end + (wd - wd_end) * (1 + cos(pi t / T)) / 2 (weights only)
  centre: c <- 0.9 c + 0.1 mean(teacher outputs); teacher <- m teacher + (1 - m) student
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sslforge import distributed
from sslforge.launcher.env import init_distributed
from sslforge.trainer.loop import Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import (FixedLoader, assert_resumed_losses_equal, assert_two_ranks_equal_one,
                                    global_batch, local_slice, one_step_of, tiny_config, view_sizes)

RECIPE = "dino_synth"
SMALL = ["method.out_dim=64", "data.views.2.count=2"]  # 2 global 16 px + 2 local 8 px crops
BATCH, STEPS_PER_EPOCH = 8, 3


def _loader(cfg: Any, world: int, steps_per_epoch: int) -> FixedLoader:
    sizes = view_sizes(cfg)
    return FixedLoader([local_slice(global_batch(BATCH, sizes, seed=i), distributed.rank(), world)
                        for i in range(steps_per_epoch)])


def _trainer(run_dir: str, *overrides: str, steps_per_epoch: int = STEPS_PER_EPOCH) -> Trainer:
    cfg = tiny_config(run_dir, *SMALL, f"optim.batch_size={BATCH}", "train.log_every_steps=1",
                      "train.ckpt_every_steps=100", *overrides, recipe=RECIPE)
    env = init_distributed("gloo")
    return Trainer(cfg, env, loader=_loader(cfg, env.world_size, steps_per_epoch))


# ----------------------------------------------------------------------- 2 ranks == 1 rank
# SGD (Adam's first step is sign(g), which turns float rounding in near-zero gradients into
# lr-sized differences); the last layer trained from step 0; momentum 0.5 so the teacher moves
# visibly; a clipping norm small enough that per-parameter clipping changes some gradients.
EQUIV = ["optim.name=sgd", "method.freeze_last_layer=0", "method.momentum_teacher=0.5",
         "engine.grad_clip=0.05"]


def test_one_step_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), RECIPE, *SMALL, *EQUIV)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), RECIPE, *SMALL, *EQUIV)
    assert_two_ranks_equal_one(single, pair)  # student, teacher (EMA), centre, running statistics
    # what the comparison covers: a moved centre and teacher, a trained last layer, active clipping
    assert single["buffers"]["center"].abs().sum() > 0
    assert any(n.startswith("teacher.") and u.abs().sum() > 0 for n, u in single["update"].items())
    assert any("last_layer" in n and g.abs().sum() > 0 for n, g in single["grads"].items())
    assert any(abs(g.norm().item() - 0.05) < 1e-4 for g in single["grads"].values())


# ------------------------------------------------- schedules, freeze, centre and teacher, 1 rank
SCHEDULE = ["train.steps=12", "method.warmup_teacher_temp=0.04", "method.teacher_temp=0.07",
            "method.warmup_teacher_temp_epochs=3", "method.momentum_teacher=0.9",
            "method.freeze_last_layer=1", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
            "optim.name=adamw", "optim.warmup_epochs=0"]
TOTAL = 12


def _record_training(run_dir: str) -> list[dict[str, Any]]:
    """Train 12 steps, recording around each post-step hook what the tests below check."""
    trainer = _trainer(run_dir, *SCHEDULE)
    method, optimizer = trainer.method, trainer.engine.optimizer
    hook, records = method.on_after_optimizer_step, []

    def recorded_hook(step: int, total: int) -> None:
        crops = trainer.loader.batches[step % STEPS_PER_EPOCH]["views"][:2]
        with torch.no_grad():  # the teacher's outputs, recomputed on a copy
            teacher_out = copy.deepcopy(method.teacher)(crops)
        record = {"scheduled": dict(method.scheduled), "teacher_out": teacher_out,
                  "center_before": method.center.clone(),
                  "teacher_before": {n: p.clone() for n, p in method.teacher.named_parameters()},
                  "groups": [{"weight_decay": g["weight_decay"], "lr": g["lr"],
                              "last_layer": g.get("freeze_steps", 0) > 0, "no_decay": g.get("no_decay")}
                             for g in optimizer.param_groups]}
        hook(step, total)
        last = [p for n, p in method.student.named_parameters() if "last_layer" in n and p.requires_grad]
        record.update(
            center_after=method.center.clone(),
            teacher_after={n: p.clone() for n, p in method.teacher.named_parameters()},
            student_after={n: p.clone() for n, p in method.student.named_parameters()},
            last_layer=[p.clone() for p in last],
            last_layer_state=[{k: v.clone() for k, v in optimizer.state[p].items() if k != "step"}
                              for p in last])
        records.append(record)

    method.on_after_optimizer_step = recorded_hook
    trainer.fit()
    return records


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    (result,) = run_ranks(_record_training, 1, str(tmp_path_factory.mktemp("dino_schedule")))
    assert len(result) == TOTAL
    return result


@pytest.mark.parametrize("step", [0, 4, TOTAL - 1])
def test_teacher_temperature_and_momentum_follow_dino(records: list[dict[str, Any]], step: int) -> None:
    epoch = step // STEPS_PER_EPOCH
    warmup = [0.04 + (0.07 - 0.04) * e / (3 - 1) for e in range(3)]  # np.linspace(0.04, 0.07, 3)
    temp = warmup[epoch] if epoch < 3 else 0.07
    momentum = 1 - (1 - 0.9) * (math.cos(math.pi * step / TOTAL) + 1) / 2
    scheduled = records[step]["scheduled"]
    assert scheduled["teacher_temp"] == pytest.approx(temp, abs=1e-12)
    assert scheduled["teacher_momentum"] == pytest.approx(momentum, abs=1e-12)


@pytest.mark.parametrize("step", [0, 4, TOTAL - 1])
def test_weight_decay_cosine_on_weights_only(records: list[dict[str, Any]], step: int) -> None:
    wd = 0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * step / TOTAL)) / 2
    frozen = step < STEPS_PER_EPOCH
    groups = records[step]["groups"]
    assert any(g["no_decay"] for g in groups) and any(not g["no_decay"] for g in groups)
    for group in groups:
        expected = 0.0 if group["no_decay"] or (group["last_layer"] and frozen) else wd
        assert group["weight_decay"] == pytest.approx(expected, abs=1e-12)
        assert (group["lr"] == 0.0) == (group["last_layer"] and frozen)


def test_last_layer_frozen_for_the_first_epoch(records: list[dict[str, Any]]) -> None:
    """DINO's freeze_last_layer=1: the weight-normalised layer and its Adam moments stay exactly
    as initialised during epoch 0 (steps 0-2), then train; every other weight trains from step 0."""
    initial = records[0]["teacher_before"]  # the teacher starts as the student's copy
    initial_last = [initial[n] for n in sorted(initial) if "last_layer" in n and "original1" in n]
    assert len(initial_last) == 1  # v; g is frozen by norm_last_layer in this preset
    for step in range(STEPS_PER_EPOCH):
        (weight,) = records[step]["last_layer"]
        assert torch.equal(weight, initial_last[0]), step
        for name, value in records[step]["last_layer_state"][0].items():
            assert not value.any(), (step, name)
    (weight,) = records[STEPS_PER_EPOCH]["last_layer"]
    assert not torch.equal(weight, initial_last[0])
    assert all(v.any() for v in records[STEPS_PER_EPOCH]["last_layer_state"][0].values())
    others = [n for n in initial if "last_layer" not in n and n.endswith("weight")]
    assert all(not torch.equal(records[0]["student_after"][n], initial[n]) for n in others)


@pytest.mark.parametrize("step", [0, 4, TOTAL - 1])
def test_centre_and_teacher_updates(records: list[dict[str, Any]], step: int) -> None:
    record = records[step]
    expected_center = 0.9 * record["center_before"] + 0.1 * record["teacher_out"].mean(dim=0, keepdim=True)
    assert torch.allclose(record["center_after"], expected_center, atol=1e-6, rtol=0)
    m = record["scheduled"]["teacher_momentum"]
    for name, before in record["teacher_before"].items():
        expected = m * before + (1 - m) * record["student_after"][name]
        assert torch.allclose(record["teacher_after"][name], expected, atol=1e-6, rtol=0), name


# ------------------------------------------------------------------------------------ resume
# 2 steps per epoch, 5 steps: the stop at step 3 falls inside the last layer's freeze (4 steps)
# and the temperature warm-up (2 epochs), mid-epoch; the resumed run must bring back the teacher,
# the centre, the optimiser and the position.
RESUME = ["train.steps=5", "method.freeze_last_layer=2", "method.warmup_teacher_temp_epochs=2",
          "method.teacher_temp=0.07", "optim.warmup_epochs=1"]
RESUME_STEPS, RESUME_STOP = 5, 3


def _train_whole_and_split(whole: str, split: str) -> dict[str, dict[str, torch.Tensor]]:
    """The uninterrupted run, then the same run stopped and resumed (one process group for all
    three trainers)."""
    done = _trainer(whole, *RESUME, steps_per_epoch=2)
    assert done.fit().step == RESUME_STEPS
    assert _trainer(split, *RESUME, steps_per_epoch=2).fit(stop_at_step=RESUME_STOP).step == RESUME_STOP
    resumed = _trainer(split, *RESUME, steps_per_epoch=2)
    assert resumed.pos.step == RESUME_STOP
    assert resumed.fit().step == RESUME_STEPS
    return {"whole": _state(done), "split": _state(resumed)}


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trainer.method.state_dict().items()}


def test_resume_restores_teacher_and_centre(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    states = run_ranks(_train_whole_and_split, 2, str(whole), str(split))
    assert_resumed_losses_equal(whole, split, RESUME_STEPS)
    for rank_states in states:
        assert rank_states["whole"].keys() == rank_states["split"].keys()
        assert any(k.startswith("teacher.") for k in rank_states["whole"]) and "center" in rank_states["whole"]
        for name, value in rank_states["whole"].items():
            assert torch.allclose(rank_states["split"][name].float(), value.float(), atol=1e-6, rtol=0), name
