"""Non-finite steps (issue 7, reliability 3): a skipped step changes nothing, no checkpoint holds a
NaN or inf, the newest finite checkpoint is never pruned for a broken one, and a run that skipped
steps says so in its last line (exit 1 when its last steps were all skipped).

Faults are injected as they were seen: `optim.base_lr=1e6` (batch-norm statistics overflow), a NaN
pixel on one rank, an inf gradient behind a finite loss, and non-finite state at save time.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import pytest
import torch

from sslforge import distributed
from sslforge.launcher.env import init_distributed
from sslforge.launcher.worker import run_rank
from sslforge.methods import METHODS, build_method
from sslforge.methods.base import PartsMethod
from sslforge.trainer.loop import NonFiniteLossError, Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import FixedLoader, global_batch, local_slice, tiny_config, view_sizes

HIGH_LR = ["optim.base_lr=1e6", "optim.lr_scaling=none", "optim.warmup_epochs=0"]


def _batches(world: int, batch: int, count: int, poison_step: int | None = None,
             sizes: Sequence[int] = (16, 16)) -> FixedLoader:
    """`count` fixed batches of crops of `sizes`; at `poison_step` rank 1 alone gets a NaN pixel."""
    batches = []
    for i in range(count):
        part = local_slice(global_batch(batch, sizes, seed=i), distributed.rank(), world)
        if i == poison_step and distributed.rank() == 1:
            part["views"][0][0, 0, 0, 0] = float("nan")
        batches.append(part)
    return FixedLoader(batches)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor a step may touch: parameters, buffers and the optimiser's state."""
    state = {f"module.{k}": v.detach().clone() for k, v in trainer.method.state_dict().items()}
    for i, entry in enumerate(trainer.engine.optimizer.state.values()):
        state.update({f"optimizer.{i}.{k}": v.clone() for k, v in entry.items() if torch.is_tensor(v)})
    return state


class _Watched(Trainer):
    """The real trainer, recording for every skipped step which tensors it changed; optionally
    an inf gradient on rank 1's first parameter at step index `inf_grad_at` (the loss stays finite)."""

    def __init__(self, *args: Any, inf_grad_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: dict[int, list[str]] = {}
        self.inf_grad_at = inf_grad_at

    def _step(self, batch: dict[str, Any]) -> dict[str, Any]:
        hook = None
        if self.pos.step == self.inf_grad_at and self.env.rank == 1:
            hook = next(self.method.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
        before = _state(self)
        record = super()._step(batch)
        if hook is not None:
            hook.remove()
        if record["nonfinite_skipped"]:
            after = _state(self)
            self.changed[self.pos.step + 1] = [k for k in before if not torch.equal(before[k], after[k])]
        return record


def _run_rank(recipe: str, run_dir: str, world: int, batch: int, count: int, poison_step: int | None,
              inf_grad_at: int | None, *overrides: str) -> dict[str, Any]:
    """`run_rank` (what `sslforge train` runs on every rank) on in-memory batches: its exit status,
    its stderr, and what each skipped step changed."""
    cfg = tiny_config(run_dir, f"optim.batch_size={batch}", "train.log_every_steps=1", *overrides, recipe=recipe)
    env = init_distributed("gloo")
    made: list[_Watched] = []
    loader = _batches(world, batch, count, poison_step, view_sizes(cfg))

    def run(cfg: Any) -> Any:
        made.append(_Watched(cfg, env, loader=loader, inf_grad_at=inf_grad_at))
        return made[0].fit()

    err = io.StringIO()
    with mock.patch("sslforge.trainer.loop.run", run), contextlib.redirect_stderr(err):
        code = run_rank(cfg)
    trainer = made[0]
    return {"code": code, "stderr": err.getvalue(), "changed": trainer.changed,
            "finite": all(bool(torch.isfinite(t).all()) for t in _state(trainer).values() if t.is_floating_point())}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every floating tensor in a checkpoint's files (model, optimiser, client state), by path."""
    found: dict[str, torch.Tensor] = {}

    def walk(value: Any, where: str) -> None:
        if torch.is_tensor(value):
            if value.is_floating_point():
                found[where] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}/{i}")

    for path in sorted(ckpt.glob("*.pt")):
        walk(torch.load(path, map_location="cpu", weights_only=False), path.name)
    return found


def _module_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_high_lr_skips_change_nothing_and_every_checkpoint_is_finite(tmp_path: Path) -> None:
    """base_lr=1e6: the running statistics overflow a few steps in, and from then on every step is
    skipped. Before the fix the overflowed batch-norm buffers stayed, the checkpoints written after
    it held them (with a small keep_last, pruning the last good one), and the run exited 0."""
    results = run_ranks(_run_rank, 2, "simclr_synth", str(tmp_path), 2, 32, 4, None, None, *HIGH_LR, "train.steps=7",
                        "train.ckpt_every_steps=3", "train.keep_last=3")
    root = tmp_path / "checkpoints"
    ckpts = sorted(root.glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000003", "step_00000006", "step_00000007"]
    assert (root / "latest").read_text() == "step_00000007"
    for ckpt in ckpts:
        bad = [k for k, t in _checkpoint_tensors(ckpt).items() if not bool(torch.isfinite(t).all())]
        assert not bad, (ckpt.name, bad)
    records = _records(tmp_path)
    skipped = [r["step"] for r in records if r.get("nonfinite_skipped")]
    applied = [r["step"] for r in records if r.get("nonfinite_skipped") is False]
    assert skipped and skipped[-1] == 7, skipped  # from the overflow on, every step is skipped
    for r in results:
        assert sorted(r["changed"]) == skipped
        assert all(changed == [] for changed in r["changed"].values()), r["changed"]  # buffers included
        assert r["finite"]
    # Checkpoints with no applied step between them are identical (nothing moved while skipping).
    for older, newer in zip(ckpts, ckpts[1:]):
        a, b = int(older.name[5:]), int(newer.name[5:])
        if not any(a < s <= b for s in applied):
            old_state, new_state = _module_state(older), _module_state(newer)
            assert all(torch.equal(old_state[k], new_state[k]) for k in old_state), (older.name, newer.name)
    # The run ended inside a run of skipped steps: exit 1, and the last line says what happened.
    for r in results:
        assert r["code"] == 1
        last = r["stderr"].strip().splitlines()[-1]
        assert last.startswith("sslforge: error: training ended with its last") and "skipped" in last
    summary = records[-1]
    assert summary["nonfinite_skipped_steps"] == len(skipped)
    assert (summary["first_nonfinite_step"], summary["last_nonfinite_step"]) == (skipped[0], skipped[-1])


def test_poison_batch_on_one_rank_is_undone_and_reported(tmp_path: Path) -> None:
    """A NaN pixel on rank 1 at step 2: every rank skips it and puts back the running statistics
    (global-batch ones, so NaN on every rank); the run recovers, exits 0 and its last line says a
    step was skipped."""
    results = run_ranks(_run_rank, 2, "simclr_synth", str(tmp_path), 2, 8, 3, 1, None, "train.steps=3")
    for r in results:
        assert r["changed"] == {2: []}
        assert r["finite"] and r["code"] == 0
    last = results[0]["stderr"].strip().splitlines()[-1]  # rank 0 speaks for the job
    assert last.startswith("sslforge: warning: finished at step 3, but 1 of 3 steps were skipped")
    assert "at step 2" in last
    assert "warning" not in results[1]["stderr"]
    records = _records(tmp_path)
    assert {r["step"]: r["nonfinite_skipped"] for r in records if "nonfinite_skipped" in r} == \
        {1: False, 2: True, 3: False}
    assert records[-1]["nonfinite_skipped_steps"] == 1


@pytest.mark.parametrize("recipe, overrides", [
    ("moco_v2_synth", ["method.queue_size=16"]),  # the queue and its pointer, the key encoder
    ("byol_synth", []),  # the target network and its statistics
    ("dino_synth", ["method.out_dim=64", "data.views.2.count=2"]),  # the centre, the teacher
])
def test_a_skipped_step_leaves_queues_teachers_and_centres_as_they_were(
        tmp_path: Path, recipe: str, overrides: list[str]) -> None:
    """The same poisoned batch for the methods with state beyond the parameters: the skipped
    step changes nothing (the whole state dict and the optimiser state are compared)."""
    results = run_ranks(_run_rank, 2, recipe, str(tmp_path), 2, 8, 3, 1, None, "train.steps=3", *overrides)
    for r in results:
        assert r["changed"] == {2: []}
        assert r["finite"] and r["code"] == 0
    assert [r["step"] for r in _records(tmp_path) if r.get("nonfinite_skipped")] == [2]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_finite_loss_with_inf_gradient_is_skipped_by_every_rank(tmp_path: Path, zero_stage: int) -> None:
    """An overflow in the backward on rank 1 (finite loss): ZeRO 0 sees it in the reduced
    `p.grad`, ZeRO 2 in DeepSpeed's own check of its partitions; either way no parameter or
    optimiser state moves, the method's post-step hook is not run, and the step is logged as
    skipped."""
    results = run_ranks(_run_rank, 2, "simclr_synth", str(tmp_path), 2, 8, 3, None, 1, "train.steps=3",
                        f"engine.zero_stage={zero_stage}")
    for r in results:
        assert r["changed"] == {2: []}
        assert r["finite"] and r["code"] == 0
    records = _records(tmp_path)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())  # the loss never showed it
    assert [r["step"] for r in records if r.get("nonfinite_skipped")] == [2]


def _save_poisoned(run_dir: str, world: int) -> dict[str, str]:
    """Checkpoint at step 2, then try to save with one non-finite tensor on one rank at a time."""
    cfg = tiny_config(run_dir, "optim.batch_size=8", "train.steps=3", "train.keep_last=1")
    env = init_distributed("gloo")
    trainer = Trainer(cfg, env, loader=_batches(world, 8, 3))
    trainer.fit(stop_at_step=2)
    running_var = next(b for n, b in trainer.method.named_buffers() if n.endswith("running_var"))
    exp_avg = next(iter(trainer.engine.optimizer.state.values()))["exp_avg"]
    targets = {"buffer": (running_var, 1), "parameter": (next(trainer.method.parameters()), 1),
               "optimizer": (exp_avg, 0)}
    trainer.pos.step = 3
    messages = {}
    for name, (tensor, rank) in targets.items():
        kept = tensor.detach().clone()
        if env.rank == rank:
            with torch.no_grad():
                tensor.view(-1)[0] = float("nan")
        try:
            trainer.save()
            messages[name] = "saved"
        except NonFiniteLossError as exc:
            messages[name] = str(exc)
        with torch.no_grad():
            tensor.copy_(kept)
    trainer.save()  # finite again: written, and only now is step 2 pruned (keep_last=1)
    return messages


def test_save_refuses_nonfinite_state_and_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    """Before the fix only parameters were checked: a NaN buffer or optimiser moment was written,
    and with keep_last=1 the finite checkpoint before it was pruned."""
    results = run_ranks(_save_poisoned, 2, str(tmp_path), 2)
    root = tmp_path / "checkpoints"
    for rank, messages in enumerate(results):
        for name, poisoned_rank in (("buffer", 1), ("parameter", 1), ("optimizer", 0)):
            message = messages[name]
            assert message.startswith("non-finite state at step 3"), (name, message)
            assert "checkpoint not written, the last finite checkpoint is step_00000002" in message
            if rank == poisoned_rank:
                expected = {"buffer": "running_var", "parameter": "backbone.conv1.weight",
                            "optimizer": "optimizer state"}[name]
                assert expected in message, message
            else:
                assert "on another rank" in message, message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]
    assert (root / "latest").read_text() == "step_00000003"


# STL's stages and their baseline run on a FAN (BatchNorm in its patch stem and MLP); the student's
# frozen labeler is a freshly built stage-1 classifier rather than a trained run's.
FAN = ["model.backbone=fan_tiny_hybrid", "model.depth=1"]
ON_FAN = {"supervised", "stl_labeler", "stl_student"}


def _fresh_labeler() -> Any:
    return tiny_config("unused", *FAN, recipe="stl_labeler_synth")


# The linear probe's pretrained encoder: a freshly built SimCLR one (the BN on its features moves).
PROBE = ["method.source=unused", "method.feature_bn=true"]


def test_training_step_changes_only_the_buffers_it_declares() -> None:
    """The method contract a skipped step relies on (methods/base.py): whatever `training_step`
    changes in place is in `forward_buffers()`, so the trainer can put it back."""
    labeler = mock.patch.multiple("sslforge.methods.stl", labeler_config=lambda source: _fresh_labeler(),
                                  load_labeler=lambda source: build_method(_fresh_labeler()).classifier().eval())
    pretrained = tiny_config("unused")
    probed = mock.patch.multiple("sslforge.methods.linear_probe", source_config=lambda source: pretrained,
                                 pretrained_encoder=lambda source: (build_method(pretrained).encoder(), 0))
    for name in METHODS:
        with labeler, probed:
            recipe = "eval/linear_synth" if name == "linear" else f"{name}_synth"
            cfg = tiny_config("unused", *(FAN if name in ON_FAN else []), *(PROBE if name == "linear" else []),
                              recipe=recipe)
            method = build_method(cfg).train()
        method.scheduled = {key: values[0] for key, values in method.schedules(10, 10).items()}
        declared = {id(b) for b in method.forward_buffers()}
        before = {n: b.clone() for n, b in method.named_buffers()}
        batch = global_batch(8, view_sizes(cfg))
        if isinstance(method, PartsMethod):  # every part's loss, as at a step where all update
            method.updating = method.part_names
            for part in method.part_names:
                method.part_step(part, batch, 0)
        else:
            method.training_step(batch, 0)
        changed = [n for n, b in method.named_buffers() if not torch.equal(before[n], b)]
        assert changed or not declared, name  # the declared running statistics moved
        assert all(id(dict(method.named_buffers())[n]) in declared for n in changed), (name, changed)
