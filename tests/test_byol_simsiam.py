"""BYOL and SimSiam: one step on 2 gloo ranks with B/2 each equals 1 rank with B (loss, gradients,
updated parameters, BYOL's target after its EMA, batch-norm statistics); BYOL's momentum
schedule and target EMA over real steps against the paper's formula; LARS's exclusions; SimSiam's
predictor lr held at the peak while the rest follows the cosine.

The losses themselves are checked against hand-computed values in the losses' tests.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn

from sslforge import distributed
from sslforge.config import load_config
from sslforge.launcher.env import init_distributed
from sslforge.methods import build_method
from sslforge.trainer.loop import Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import (FixedLoader, assert_two_ranks_equal_one, global_batch, local_slice, one_step_of,
                                    tiny_config, view_sizes)

# Heads as small as the tiny projector (TINY: 32 -> 16); LARS / SGD as published (Adam's first
# step is sign(g), which turns float rounding in near-zero gradients into differences of size lr).
BYOL = ("byol_synth", ["method.pred_hidden_dim=32", "optim.name=lars"])
SIMSIAM = ("simsiam_synth", ["method.pred_hidden_dim=8", "optim.name=sgd"])
ATOL = 1e-5


@pytest.mark.parametrize("recipe, overrides", [BYOL, SIMSIAM], ids=["byol", "simsiam"])
def test_one_step_two_ranks_equal_one_rank(tmp_path, recipe: str, overrides: list[str]) -> None:
    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), recipe, *overrides)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), recipe, *overrides)
    assert_two_ranks_equal_one(single, pair, ATOL)  # BYOL: the target and its statistics included


def _byol_tau(base: float, k: int, total: int) -> float:
    """The paper's (and byol/utils/schedules.py's) target decay at step k of K."""
    return 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2


def test_byol_momentum_schedule_matches_the_paper() -> None:
    cfg = load_config("byol_synth", ["model.proj_hidden_dim=32", "method.pred_hidden_dim=32"])
    total = 1000
    tau = build_method(cfg).schedules(total, 100)["momentum"]
    assert len(tau) == total
    for k in (0, total // 2, total - 1):
        assert tau[k] == pytest.approx(_byol_tau(cfg.method.base_momentum, k, total), abs=1e-12), k
    assert tau[0] == pytest.approx(0.99) and tau[total // 2] == pytest.approx(0.995)


def _run_steps(run_dir: str, recipe: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """`steps` real Trainer steps on a fixed batch; after each, every group's lr and the
    method's parameters."""
    cfg = tiny_config(run_dir, "optim.batch_size=8", f"train.steps={steps}", *overrides, recipe=recipe)
    env = init_distributed("gloo")
    batch = local_slice(global_batch(8, view_sizes(cfg)), distributed.rank(), env.world_size)
    trainer = Trainer(cfg, env, loader=FixedLoader([batch] * steps))
    predictor = {id(p) for p in trainer.method.predictor.parameters()}
    lrs, params = [], [_snapshot(trainer.method)]
    for _ in range(steps):
        trainer.begin_step()
        lrs.append([(g["lr"], all(id(p) in predictor for p in g["params"]))
                    for g in trainer.engine.optimizer.param_groups])
        _, finite = trainer.forward_backward(batch)
        assert finite and trainer.apply_step()
        params.append(_snapshot(trainer.method))
        trainer.pos.step += 1
    return {"lrs": lrs, "params": params, "total": trainer.total_steps}


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_byol_target_follows_the_schedule_over_steps(tmp_path) -> None:
    """The target starts as a copy of the online backbone + projector (no predictor) and after
    step k is tau_k target + (1 - tau_k) online, tau_k the paper's cosine: the post-step hook
    reads this step's scheduled value, and the optimiser never touches the target."""
    recipe, overrides = BYOL
    steps = 4
    overrides = [*overrides, "method.base_momentum=0.5", "optim.warmup_epochs=0"]  # moves from step 0
    (run,) = run_ranks(_run_steps, 1, str(tmp_path), recipe, overrides, steps)
    first = run["params"][0]
    targets = [n for n in first if n.startswith("momentum_")]
    assert {n.removeprefix("momentum_") for n in targets} == {
        n for n in first if n.startswith(("backbone.", "projector."))}
    for name in targets:
        assert torch.equal(first[name], first[name.removeprefix("momentum_")]), name
    for k in range(steps):
        tau = _byol_tau(0.5, k, run["total"])
        before, after = run["params"][k], run["params"][k + 1]
        assert any(not torch.equal(after[n], before[n]) for n in targets), k  # the target moved
        for name in targets:
            expected = tau * before[name] + (1 - tau) * after[name.removeprefix("momentum_")]
            assert torch.allclose(after[name], expected, atol=1e-6, rtol=0), (k, name)


def test_byol_lars_excludes_biases_and_norms(tmp_path) -> None:
    """As the official optimiser's `exclude_bias_and_norm`: biases and batch-norm parameters get
    neither weight decay nor the trust ratio; every other weight gets both. The target is not
    in the optimiser."""
    recipe, overrides = BYOL
    cfg = tiny_config(tmp_path, *overrides, "optim.weight_decay=1e-3", recipe=recipe)
    method = build_method(cfg)
    excluded = {id(p) for m in method.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                for p in m.parameters(recurse=False)}
    excluded |= {id(p) for n, p in method.named_parameters() if n.endswith(".bias")}
    from sslforge.trainer.optim import build_optimizer

    optimizer = build_optimizer(method, method.param_groups(), cfg, lr=1.0)
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.add(id(p))
            exclude = id(p) in excluded
            assert group["lars_adapt"] is not exclude
            assert group["weight_decay"] == (0.0 if exclude else 1e-3)
    online = {id(p) for m in (method.backbone, method.projector, method.predictor) for p in m.parameters()}
    assert seen == online


def test_simsiam_predictor_lr_fixed_while_the_rest_follows_the_cosine(tmp_path) -> None:
    recipe, overrides = SIMSIAM
    steps = 4
    (run,) = run_ranks(_run_steps, 1, str(tmp_path), recipe, overrides, steps)
    cfg = load_config(recipe, ["data.train=x", "optim.batch_size=8"])
    peak = cfg.optim.base_lr * 8 / 256  # linear scaling rule, no warmup in SimSiam's recipe
    assert cfg.optim.warmup_epochs == 0
    for k, groups in enumerate(run["lrs"]):
        cosine = peak * 0.5 * (1 + math.cos(math.pi * k / run["total"]))
        assert sorted(is_pred for _, is_pred in groups) == [False, True]
        for lr, is_predictor in groups:
            assert lr == pytest.approx(peak if is_predictor else cosine, rel=1e-12), (k, is_predictor)
    assert run["lrs"][-1][0][0] < peak  # the schedule did move
