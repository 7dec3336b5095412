"""Per-group rules of the method contract, through real Trainer steps on 2 gloo ranks.

A group frozen for the first epoch does not move, optimiser state included, under ZeRO 0/1/2 and
bf16, and moves afterwards; a `fixed_lr` group keeps the peak lr while the others warm up; the
weight-decay cosine reaches only decayed groups; per-parameter clipping is DINO's formula; a
method's declared schedules reach `scheduled` at every step.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from sslforge import distributed
from sslforge.config import ConfigError
from sslforge.launcher.env import init_distributed
from sslforge.methods.simclr import SimCLR
from sslforge.trainer.group_rules import GroupRules
from sslforge.trainer.loop import Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import FixedLoader, global_batch, local_slice, tiny_config

BATCH, EPOCH = 8, 2  # steps per epoch


def _projector_rules(rules: dict[str, Any]):  # type: ignore[no-untyped-def]
    """SimCLR with its projector in a group of its own, carrying `rules`."""
    def param_groups(self: SimCLR) -> list[dict[str, Any]]:
        return [{"params": list(self.backbone.parameters())},
                {"params": list(self.projector.parameters()), **rules}]
    return param_groups


def _trainer(run_dir: str, *overrides: str) -> Trainer:
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", "train.steps=4", *overrides)
    env = init_distributed("gloo")
    world = env.world_size
    batches = [local_slice(global_batch(BATCH, seed=i), distributed.rank(), world) for i in range(EPOCH)]
    return Trainer(cfg, env, loader=FixedLoader(batches))


def _frozen_state(trainer: Trainer) -> list[torch.Tensor]:
    """Every optimiser-state tensor of the frozen groups (ZeRO keeps it on flat partitions)."""
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    return [t for g in trainer.engine.optimizer.param_groups if g["freeze_steps"]
            for p in g["params"] for t in inner.state.get(p, {}).values()
            if torch.is_tensor(t) and t.numel() > 1]


def _freeze_run(run_dir: str, *overrides: str) -> dict[str, Any]:
    SimCLR.param_groups = _projector_rules({"freeze_epochs": 1})
    trainer = _trainer(run_dir, *overrides)
    frozen0 = {n: p.detach().clone() for n, p in trainer.method.projector.named_parameters()}
    backbone0 = [p.detach().clone() for p in trainer.method.backbone.parameters()]
    batches = trainer.loader.batches
    for step in range(3):
        trainer.begin_step()
        _, finite = trainer.forward_backward(batches[step % EPOCH])
        assert finite and trainer.apply_step()
        trainer.pos.step += 1
        if step == EPOCH - 1:  # the last frozen step
            still = all(torch.equal(p, frozen0[n]) for n, p in trainer.method.projector.named_parameters())
            state_zero = all(not t.any() for t in _frozen_state(trainer))
            backbone_moved = any(not torch.equal(p, b) for p, b in zip(trainer.method.backbone.parameters(), backbone0))
    moved = any(not torch.equal(p, frozen0[n]) for n, p in trainer.method.projector.named_parameters())
    return {"still": still, "state_zero": state_zero, "state_seen": bool(_frozen_state(trainer)),
            "backbone_moved": backbone_moved, "moved_after": moved}


def _freeze_everywhere(run_dir: str) -> dict[str, dict[str, Any]]:
    adamw = ["optim.name=adamw", "optim.weight_decay=0.1", "optim.warmup_epochs=0"]
    runs = {"zero0-lars": ["optim.name=lars", "optim.weight_decay=0.1", "optim.warmup_epochs=0"],
            **{f"zero{z}-adamw": [*adamw, f"engine.zero_stage={z}"] for z in (0, 1, 2)},
            "zero2-adamw-bf16": [*adamw, "engine.zero_stage=2", "engine.precision=bf16"]}
    return {name: _freeze_run(f"{run_dir}/{name}", *o) for name, o in runs.items()}


def test_a_frozen_group_and_its_optimiser_state_do_not_move(tmp_path) -> None:
    for rank_result in run_ranks(_freeze_everywhere, 2, str(tmp_path)):
        for name, got in rank_result.items():
            assert got["still"], f"{name}: frozen parameters moved"
            assert got["state_zero"] and got["state_seen"], f"{name}: frozen optimiser state changed"
            assert got["backbone_moved"], f"{name}: the rest did not train"
            assert got["moved_after"], f"{name}: the group stayed frozen after its epoch"


def _group_values(run_dir: str) -> list[list[tuple[float, float, bool, bool]]]:
    """(lr, weight decay, fixed_lr, no_decay) of every optimiser group at every step."""
    SimCLR.param_groups = _projector_rules({"fixed_lr": True})
    trainer = _trainer(run_dir, "optim.name=sgd", "optim.warmup_epochs=1", "optim.weight_decay=0.04",
                       "optim.weight_decay_end=0.4", "optim.base_lr=0.5", "optim.lr_scaling=none")
    out = []
    for step in range(trainer.total_steps):
        trainer.pos.step = step
        trainer.begin_step()
        out.append([(g["lr"], g["weight_decay"], g["fixed_lr"], g["no_decay"])
                    for g in trainer.engine.optimizer.param_groups])
    return out


def test_fixed_lr_and_the_weight_decay_cosine_reach_the_right_groups(tmp_path) -> None:
    (steps,) = run_ranks(_group_values, 1, str(tmp_path))
    total = len(steps)
    for t, groups in enumerate(steps):
        lr = 0.5 * t / EPOCH if t < EPOCH else 0.5 * 0.5 * (1 + math.cos(math.pi * (t - EPOCH) / (total - EPOCH)))
        wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * t / total))  # DINO's cosine_scheduler
        for g_lr, g_wd, fixed, no_decay in groups:
            assert g_lr == pytest.approx(0.5 if fixed else lr), (t, fixed)
            assert g_wd == pytest.approx(0.0 if no_decay else wd), (t, no_decay)
    assert {(fixed, no_decay) for *_, fixed, no_decay in steps[0]} == {(a, b) for a in (0, 1) for b in (0, 1)}


def _clipped_and_raw(run_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    grads = []
    for clip in ("engine.grad_clip=0", "engine.grad_clip=0.3"):
        trainer = _trainer(f"{run_dir}/{clip}", "engine.grad_clip_mode=per_param", clip)
        trainer.begin_step()
        trainer.forward_backward(trainer.loader.batches[0])
        grads.append({n: p.grad.clone() for n, p in trainer.method.named_parameters()})
    return grads[0], grads[1]


def test_per_parameter_clipping_is_dinos_formula(tmp_path) -> None:
    raw, clipped = run_ranks(_clipped_and_raw, 2, str(tmp_path))[0]
    scaled = 0
    for name, g in raw.items():
        norm = float(g.double().norm())
        coef = 0.3 / (norm + 1e-6)
        expected = g * coef if coef < 1 else g
        scaled += coef < 1
        # rtol: the trainer takes the norm in float32, the test in float64
        assert torch.allclose(clipped[name], expected, rtol=1e-4, atol=1e-9), name
    assert 0 < scaled < len(raw)  # some clipped, some left alone


def _scheduled_values(run_dir: str) -> list[float]:
    SimCLR.schedules = lambda self, total, per_epoch: {"momentum": np.linspace(0.9, 1.0, total)}
    trainer = _trainer(run_dir)
    seen = []
    for step in range(trainer.total_steps):
        trainer.pos.step = step
        trainer.begin_step()
        seen.append(trainer.method.scheduled["momentum"])
    return seen


def test_method_schedules_reach_the_method_each_step(tmp_path) -> None:
    (seen,) = run_ranks(_scheduled_values, 1, str(tmp_path))
    assert seen == pytest.approx(list(np.linspace(0.9, 1.0, 4)))


def test_per_parameter_clipping_under_zero_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="grad_clip_mode"):
        tiny_config(tmp_path, "engine.grad_clip_mode=per_param", "engine.grad_clip=3.0",
                    "engine.zero_stage=1", "optim.name=adamw")


def test_warm_up_starts_from_warmup_start_lr(tmp_path) -> None:
    """SwAV's `--start_warmup 0.3` at batch 4096: a line from 0.3 (absolute) to the scaled peak
    0.3 x 4096 / 256 = 4.8, then the cosine to min_lr."""
    cfg = tiny_config(tmp_path, "optim.batch_size=4096", "optim.base_lr=0.3", "optim.warmup_epochs=2",
                      "optim.warmup_start_lr=0.3", "optim.min_lr=0.0048")
    lr = GroupRules(cfg, total_steps=10, steps_per_epoch=2).lr
    for t in range(4):
        assert lr[t] == pytest.approx(0.3 + (4.8 - 0.3) * t / 4), t
    assert lr[4] == pytest.approx(4.8) and lr[-1] > 0.0048 and lr[-1] == pytest.approx(
        0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * 5 / 6)))
