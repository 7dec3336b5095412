"""SwAV on the real trainer: 2 ranks equal 1 (with the queue filled and then used), unit-norm
prototypes frozen for the first iterations with still optimiser state, the queue's start epoch,
resume with the queue, the crops, the collapse signal and the refused configurations.

Expected values written out here: facebookresearch/swav main_swav.py (prototypes renormalised
every iteration, gradients cancelled for `freeze_prototypes_niters`, a queue of embeddings
filled from `epoch_queue_starts`, newest first, used once full) and src/multicropdataset.py.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from sslforge import distributed
from sslforge.config import load_config
from sslforge.launcher.env import init_distributed
from sslforge.methods import build_method
from sslforge.methods.swav import SwAV, code_std
from sslforge.trainer.loop import Trainer
from tests import emulated_device
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import (TINY, FixedLoader, assert_resumed_losses_equal, assert_tensors_close,
                                    assert_two_ranks_equal_one, global_batch, local_slice, one_step_of,
                                    tiny_config, view_sizes)

RECIPE = "swav_synth"
SMALL = ["method.num_prototypes=20", "data.views.1.count=2"]  # 2 global 16 px + 2 local 8 px crops
BATCH = 8
# SGD: at batch 8 LARS moves each weight by only lr x eta ~ 2e-5 of its norm, under the comparison's
# tolerance, where SGD's updates make a wrong gradient visible in the parameters too (LARS is
# exercised by the freeze test below); the prototypes trained from step 0.
EQUIV = ["optim.name=sgd", "method.freeze_prototypes_epochs=0", f"method.queue_length={BATCH}"]


def _unit_rows(weight: torch.Tensor) -> bool:
    return torch.allclose(weight.norm(dim=1), torch.ones(len(weight)), atol=1e-6)


# ----------------------------------------------------------------------- 2 ranks == 1 rank
def test_one_step_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    """Queue filled at step 0 (epoch_queue_starts 0): every rank's embeddings, in rank order."""
    overrides = [*SMALL, *EQUIV, "method.epoch_queue_starts=0"]
    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), RECIPE, *overrides)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), RECIPE, *overrides)
    assert_two_ranks_equal_one(single, pair)  # parameters, prototypes, queue, BN statistics
    assert single["grads"]["prototypes.weight"].abs().sum() > 0
    assert _unit_rows(single["params"]["prototypes.weight"])
    assert int(single["buffers"]["queue_filled"]) == BATCH
    assert _unit_rows(single["buffers"]["queue"].reshape(-1, single["buffers"]["queue"].shape[-1]))
    for name in ("code_std", "loss_over_log_k"):  # the collapse signals, global over ranks
        assert pair[0]["metrics"][name] == pytest.approx(single["metrics"][name], abs=1e-6), name


def _trainer(run_dir: str, steps: int, steps_per_epoch: int, *overrides: str, env: Any = None) -> Trainer:
    cfg = tiny_config(run_dir, *SMALL, f"optim.batch_size={BATCH}", f"train.steps={steps}",
                      "train.log_every_steps=1", "train.ckpt_every_steps=100", *overrides, recipe=RECIPE)
    env = env or init_distributed("gloo")
    batches = [local_slice(global_batch(BATCH, view_sizes(cfg), seed=i), distributed.rank(), env.world_size)
               for i in range(steps_per_epoch)]
    return Trainer(cfg, env, loader=FixedLoader(batches))


def _train_steps(run_dir: str, steps: int, steps_per_epoch: int, *overrides: str) -> dict[str, Any]:
    """`steps` real trainer steps; the last one's loss, gradients, parameters and buffers (as
    `one_step`), and after each step the prototypes, their optimiser state and the queue."""
    trainer = _trainer(run_dir, steps, steps_per_epoch, *overrides)
    method, optimizer = trainer.method, trainer.engine.optimizer
    named = dict(method.named_parameters())
    out: dict[str, Any] = {"initial": method.prototypes.weight.detach().clone(), "records": []}
    for step in range(steps):
        filled_before = int(method.queue_filled)
        trainer.begin_step()
        result, finite = trainer.forward_backward(trainer.loader.batches[step % steps_per_epoch])
        out["grads"] = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
        out["applied"] = finite and trainer.apply_step()
        trainer.pos.step += 1
        out["records"].append({
            "filled_before": filled_before, "scheduled": dict(method.scheduled),
            "prototypes": method.prototypes.weight.detach().clone(),
            "prototype_state": {k: v.clone() for k, v in optimizer.state[method.prototypes.weight].items()},
            "queue": method.queue.clone(), "queue_filled": int(method.queue_filled),
            "code_std": float(result["code_std"]), "loss_over_log_k": float(result["loss_over_log_k"])})
        out["loss"] = distributed.all_reduce_mean(result["loss"].detach()).item()
    out["params"] = {n: p.detach().clone() for n, p in named.items()}
    out["buffers"] = {n: b.detach().clone() for n, b in method.named_buffers()}
    return out


def test_queue_used_at_step_two_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    """A queue of one global batch, filled at step 0, full and used for the codes at step 1:
    each rank scores its share of the queue's rows."""
    args = (2, 2, *EQUIV, "method.epoch_queue_starts=0")
    (single,) = run_ranks(_train_steps, 1, str(tmp_path / "one"), *args)
    pair = run_ranks(_train_steps, 2, str(tmp_path / "two"), *args)
    assert [r["filled_before"] for r in single["records"]] == [0, BATCH]  # used at the second step
    assert_two_ranks_equal_one(single, pair)
    for one, two in zip(single["records"], pair[0]["records"]):
        assert one["code_std"] == pytest.approx(two["code_std"], abs=1e-6)  # global over ranks
        assert 0 < one["code_std"] <= 1 and 0 < one["loss_over_log_k"]


def _train_on_emulated_device(run_dir: str) -> dict[str, Any]:
    env = init_distributed("gloo")  # before the context, which registers its device for collectives
    with emulated_device.emulated_device() as device:
        trainer = _trainer(run_dir, 3, 2, *EQUIV, "method.epoch_queue_starts=0", env=replace(env, device=device))
        step = trainer.fit().step
    return {"step": step, "filled": int(trainer.method.queue_filled), "checked": dict(emulated_device.CHECKED)}


def test_collectives_take_device_tensors(tmp_path: Path) -> None:
    """NCCL's rule, checked on CPU (tests/emulated_device.py): the queue's gather, Sinkhorn's
    per-prototype sums and the code spread hand the rank's device tensors to every collective."""
    for result in run_ranks(_train_on_emulated_device, 2, str(tmp_path)):
        assert result["step"] == 3 and result["filled"] == BATCH  # the queue filled and used
        assert result["checked"].get("all_gather", 0) > 0 and result["checked"].get("all_reduce", 0) > 0


# ------------------------------------------ frozen prototypes, queue start, unit rows, 1 rank
FREEZE = ["optim.name=lars", "method.freeze_prototypes_epochs=1", f"method.queue_length={BATCH}",
          "method.epoch_queue_starts=2", "optim.warmup_epochs=0"]
STEPS, STEPS_PER_EPOCH = 6, 2  # prototypes frozen for steps 0-1; the queue fills from step 4


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    (result,) = run_ranks(_train_steps, 1, str(tmp_path_factory.mktemp("swav_freeze")), STEPS,
                          STEPS_PER_EPOCH, *FREEZE)
    return result


def test_prototypes_frozen_then_trained(frozen_run: dict[str, Any]) -> None:
    """The official cancels the prototypes' gradients for freeze_prototypes_niters; here the
    parameters stay bit-identical and LARS's momentum buffer stays zero, then both move."""
    initial, records = frozen_run["initial"], frozen_run["records"]
    assert _unit_rows(initial)  # normalised at construction
    for step in range(STEPS_PER_EPOCH):
        assert records[step]["scheduled"]["prototypes_frozen"] == 1.0
        assert torch.equal(records[step]["prototypes"], initial), step
        assert all(not v.any() for v in records[step]["prototype_state"].values()), step
    moved = records[STEPS_PER_EPOCH]
    assert moved["scheduled"]["prototypes_frozen"] == 0.0
    assert not torch.equal(moved["prototypes"], initial)
    assert all(v.any() for v in moved["prototype_state"].values())
    for record in records:
        assert _unit_rows(record["prototypes"])  # renormalised after every trained step


def test_queue_fills_from_its_start_epoch(frozen_run: dict[str, Any]) -> None:
    """epoch_queue_starts=2 at 2 steps per epoch: empty through step 3, a whole global batch of
    unit embeddings at step 4, the oldest rows replaced at step 5."""
    records = frozen_run["records"]
    start = 2 * STEPS_PER_EPOCH
    for step in range(start):
        assert records[step]["queue_filled"] == 0 and not records[step]["queue"].any(), step
        assert records[step]["scheduled"]["queue_filling"] == 0.0
    assert [r["queue_filled"] for r in records[start:]] == [BATCH, BATCH]
    assert [r["filled_before"] for r in records] == [0, 0, 0, 0, 0, BATCH]  # used at step 5
    queue = records[start]["queue"]
    assert queue.shape == (2, BATCH, 16) and _unit_rows(queue.reshape(-1, 16))
    assert not torch.equal(records[start + 1]["queue"], queue)


# ------------------------------------------------------------------------------------ resume
# 2 steps per epoch, 5 steps, stopped at 3: the prototypes frozen for steps 0-1, the queue filled
# from step 2 (epoch 1) and used from step 3, exactly where the resumed run starts.
RESUME = ["method.freeze_prototypes_epochs=1", f"method.queue_length={BATCH}", "method.epoch_queue_starts=1",
          "optim.warmup_epochs=1"]
RESUME_STEPS, RESUME_STOP = 5, 3


def _whole_and_split(whole: str, split: str) -> dict[str, dict[str, torch.Tensor]]:
    done = _trainer(whole, RESUME_STEPS, 2, *RESUME)
    assert done.fit().step == RESUME_STEPS
    assert _trainer(split, RESUME_STEPS, 2, *RESUME).fit(stop_at_step=RESUME_STOP).step == RESUME_STOP
    resumed = _trainer(split, RESUME_STEPS, 2, *RESUME)
    assert resumed.pos.step == RESUME_STOP and int(resumed.method.queue_filled) == BATCH
    assert resumed.fit().step == RESUME_STEPS
    return {name: {n: t.detach().clone() for n, t in trainer.method.state_dict().items()}
            for name, trainer in (("whole", done), ("split", resumed))}


def test_resume_restores_prototypes_and_queue(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    states = run_ranks(_whole_and_split, 2, str(whole), str(split))
    assert_resumed_losses_equal(whole, split, RESUME_STEPS)
    for rank_states in states:
        assert {"queue", "queue_filled", "prototypes.weight"} <= rank_states["whole"].keys()
        assert_tensors_close(rank_states["split"], rank_states["whole"], "state", 1e-6)


# ------------------------------------------------------------------ crops, signals, refusals
def test_views_are_swavs_multi_crop() -> None:
    """2 x 224 at scale (0.14, 1) + 6 x 96 at (0.05, 0.14); colour distortion of strength 1
    (jitter 0.8, 0.8, 0.8, 0.2 at p 0.8, grayscale 0.2), blur half the time, flip."""
    cfg = load_config("swav")
    global_view, local_view = SwAV.views(cfg)
    assert (global_view.size, global_view.count, list(global_view.scale)) == (224, 2, [0.14, 1.0])
    assert (local_view.size, local_view.count, list(local_view.scale)) == (96, 6, [0.05, 0.14])
    for view in (global_view, local_view):
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.8, 0.8, 0.2)
        assert (view.jitter_p, view.grayscale_p, view.blur_p, view.flip_p, view.solarize_p) == (0.8, 0.2, 0.5, 0.5, 0.0)


def test_code_std_is_zero_at_collapse_and_about_one_for_balanced_hard_codes() -> None:
    k = 10
    uniform = torch.full((40, k), 1.0 / k)  # every sample the same code
    one_hot = torch.eye(k).repeat(4, 1)  # each prototype the argmax of 4 samples
    assert code_std(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert code_std(one_hot).item() == pytest.approx(math.sqrt(1 - 1 / k), abs=1e-6)


def _swav(tmp_path: Path, *overrides: str) -> Any:
    return build_method(load_config(RECIPE, [*TINY, f"run_dir={tmp_path}", *SMALL, *overrides]))


def test_zero_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"swav needs engine.zero_stage=0, got 1: its prototypes are "
                                         r"L2-normalised in place"):
        _swav(tmp_path, "optim.name=sgd", "engine.zero_stage=1")


def test_queue_length_must_be_a_multiple_of_the_global_batch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"method.queue_length=100 must be 0 \(no queue\) or a multiple "
                                         r"of the global batch optim.batch_size=64.*use 64"):
        _swav(tmp_path, "optim.batch_size=64", "method.queue_length=100")


def test_prototype_scores_are_float32_under_bf16_autocast(tmp_path: Path) -> None:
    """Scores divided by epsilon 0.05 must not carry bf16's rounding into the codes."""
    method = _swav(tmp_path, "method.queue_length=0")
    cfg = method.cfg
    batch = global_batch(4, view_sizes(cfg))
    seen: list[torch.dtype] = []
    method.prototypes.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(batch, 0)
    assert seen == [torch.float32] and torch.isfinite(out["loss"])
