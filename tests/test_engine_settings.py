"""The DeepSpeed engine trains with the config's settings, read back from the engine itself.

DeepSpeed fills absent keys with its defaults (an absent `gradient_clipping` is 1.0), so the
settings are checked as the built engine reports them, and by what a step does: a gradient of
norm 200 with plain SGD at lr 1 must move the parameters by exactly -grad without clipping and
by the clipped gradient with it, under every ZeRO stage.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn as nn

from sslforge import distributed
from sslforge.trainer.loop import Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import one_step, step_trainer

# plain SGD, lr 1 at step 0: the update is exactly -(averaged, clipped) gradient
SGD = ["optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.base_lr=1.0",
       "optim.lr_scaling=none", "optim.warmup_epochs=0"]
GRAD_NORM, CLIP = 200.0, 5.0


def _trainer(run_dir: str, *overrides: str) -> Trainer:
    return step_trainer(run_dir, *SGD, *overrides)


def _forward_dtypes(trainer: Trainer) -> dict[str, set[torch.dtype]]:
    """Output dtypes of every Linear/Conv and of the loss in one forward through the engine."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in trainer.method.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    out, _ = trainer.forward_backward(trainer.loader.batches[0])
    for h in hooks:
        h.remove()
    return {"matmul": seen, "loss": {out["loss"].dtype}}


def _reported(run_dir: str) -> dict[tuple, dict[str, Any]]:
    """What each engine reports, for every precision x ZeRO stage x clipping."""
    reports = {}
    for precision, zero, clip in itertools.product(("fp32", "bf16"), (0, 1, 2), (0.0, 0.5)):
        trainer = _trainer(f"{run_dir}/{precision}-{zero}-{clip}", f"engine.precision={precision}",
                           f"engine.zero_stage={zero}", f"engine.grad_clip={clip}")
        engine = trainer.engine
        # ZeRO 1/2 reduce each parameter's gradient in the dtype their optimiser picks for it,
        # and clip with their own copy of the norm; ZeRO 0 uses the engine's.
        comm = ({engine.optimizer.get_param_comm_dtype(p) for p in trainer.method.parameters()}
                if zero else {engine.communication_data_type})
        reports[(precision, zero, clip)] = {
            "clip": engine.gradient_clipping(),
            "optimizer_clip": engine.optimizer.clip_grad if zero else engine.gradient_clipping(),
            "zero": engine.zero_optimization_stage(),
            "autocast": engine.torch_autocast_enabled(), "autocast_dtype": engine.torch_autocast_dtype(),
            "bf16_weights": engine.bfloat16_enabled(), "fp16_weights": engine.fp16_enabled(),
            "comm_dtypes": comm, "data_types": engine.get_data_types(),
            **_forward_dtypes(trainer)}
    return reports


def test_engine_reports_config_settings(tmp_path) -> None:
    (reports,) = run_ranks(_reported, 1, str(tmp_path))
    for (precision, zero, clip), got in reports.items():
        bf16 = precision == "bf16"
        assert got["clip"] == clip and got["optimizer_clip"] == clip, (precision, zero, clip, got)
        assert got["zero"] == zero, got
        assert got["autocast"] is bf16 and got["autocast_dtype"] == (torch.bfloat16 if bf16 else None), got
        assert not got["bf16_weights"] and not got["fp16_weights"], got
        assert got["data_types"] == (torch.float32, torch.float32), got
        assert got["comm_dtypes"] == {torch.float32}, got  # gradients averaged in fp32
        assert got["matmul"] == {torch.bfloat16 if bf16 else torch.float32}, got
        assert got["loss"] == {torch.float32}, got  # the loss's fp32 region


def _known_gradient(params: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Rank r's gradient is (r + 1) * u; their mean over 2 ranks, 1.5 u, has norm GRAD_NORM."""
    g = torch.Generator().manual_seed(7)
    unit = [torch.randn(p.shape, generator=g) for p in params]
    scale = GRAD_NORM / 1.5 / math.sqrt(sum(float((u * u).sum()) for u in unit))
    return [u * scale * (rank + 1) for u in unit]


def _clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_'s rule: scale by min(1, max_norm / (norm + 1e-6))."""
    if max_norm == 0:
        return grads
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return [g * coef for g in grads]


def _sgd_step_errors(run_dir: str) -> dict[tuple, dict[str, float]]:
    """One SGD step (lr 1) from a known gradient, for each ZeRO stage, without and with clipping:
    the largest deviation of the update from -clip(mean gradient), and the update's norm."""
    world = distributed.world_size()
    results = {}
    for zero, clip in itertools.product((0, 1, 2), (0.0, CLIP)):
        trainer = _trainer(f"{run_dir}/{zero}-{clip}", f"engine.zero_stage={zero}", f"engine.grad_clip={clip}")
        params = list(trainer.method.parameters())
        before = [p.detach().clone() for p in params]
        grads = _known_gradient(params, distributed.rank())
        trainer.engine.backward(sum((g * p).sum() for g, p in zip(grads, params)))  # d/dp = g
        for group in trainer.engine.optimizer.param_groups:
            group["lr"] = 1.0
        trainer.engine.step()
        per_rank = [_known_gradient(params, r) for r in range(world)]
        mean = [sum(parts) / world for parts in zip(*per_rank)]
        expected = [-g for g in _clipped(mean, clip)]
        updates = [p.detach() - b for p, b in zip(params, before)]
        results[(zero, clip)] = {
            "error": max(float((u - e).abs().max()) for u, e in zip(updates, expected)),
            "largest": max(float(e.abs().max()) for e in expected),
            "norm": math.sqrt(sum(float((u.double() ** 2).sum()) for u in updates))}
    return results


def test_gradient_clipping_follows_config(tmp_path) -> None:
    ranks = run_ranks(_sgd_step_errors, 2, str(tmp_path))
    for (zero, clip), got in ranks[0].items():
        assert got == ranks[1][(zero, clip)]
        # Unclipped: float32 rounding of p - g and of (p - g) - p only. Clipped: also the norm,
        # which torch's float32 CPU reduction gets 4e-5 wrong over a 2.4M-element conv weight.
        # Clipping at DeepSpeed's default 1.0 would be off by a factor of 5 or 200.
        tol = 1e-4 if clip else 1e-5
        assert got["error"] <= tol * got["largest"], (zero, clip, got)
        assert abs(got["norm"] - (clip or GRAD_NORM)) <= tol * (clip or GRAD_NORM), (zero, clip, got)


def _clip_after_resume(run_dir: str) -> tuple[float, float]:
    """Checkpoint a ZeRO-1 run clipping at 1 (what every run got when the key was left out),
    resume it through the Trainer with clipping off, and report the engine's and its ZeRO
    optimiser's norms (ZeRO 1/2 restore their own from the checkpoint)."""
    zero1 = ["optim.name=adamw", "engine.zero_stage=1"]
    _trainer(run_dir, *zero1, "engine.grad_clip=1.0").fit(stop_at_step=1)
    resumed = _trainer(run_dir, *zero1, "engine.grad_clip=0.0")
    assert resumed.pos.step == 1
    return resumed.engine.gradient_clipping(), resumed.engine.optimizer.clip_grad


def test_resume_keeps_configured_clipping(tmp_path) -> None:
    (clips,) = run_ranks(_clip_after_resume, 1, str(tmp_path))
    assert clips == (0.0, 0.0)


def _bf16_updates(run_dir: str) -> dict[int, torch.Tensor] | None:
    """Rank 0's parameter update after one bf16 SGD step, under each ZeRO stage, flattened."""
    updates = {}
    for zero in (0, 1, 2):
        step = one_step(f"{run_dir}/{zero}", *SGD, "engine.precision=bf16", f"engine.zero_stage={zero}")
        updates[zero] = torch.cat([u.flatten() for u in step["update"].values()])
    return updates if distributed.rank() == 0 else None


def test_bf16_zero_stages_average_gradients_in_fp32(tmp_path) -> None:
    """Same bf16 forward, same fp32 gradients: ZeRO 1/2 must average them as ZeRO 0 does.

    Tolerance 1e-5 of the update's norm: fp32 reductions in another order or bucketing differ
    by ~1e-7, while averaging in bf16 (8-bit mantissa) put ZeRO 1/2 1.8e-3 away from ZeRO 0.
    """
    updates = run_ranks(_bf16_updates, 2, str(tmp_path))[0]
    reference = updates[0]
    assert reference.norm() > 1.0  # a real step, not a frozen or zero update
    for zero in (1, 2):
        error = ((updates[zero] - reference).norm() / reference.norm()).item()
        assert error <= 1e-5, f"ZeRO-{zero} bf16 update differs from ZeRO-0 by {error:.1e} (relative)"
