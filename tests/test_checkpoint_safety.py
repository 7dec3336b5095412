"""Checkpoints are read as data only, resume takes what every rank can load, and a failed write
is one clear error on every rank (issue 7, reliability items 2, 4 and 7).

Faults are injected as they were seen: a pickle whose `__reduce__` writes a sentinel file, a
garbage or dangling `latest`, a truncated checkpoint file, a file that loads on one rank only,
and a disk that fills up in the middle of `torch.save`.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
import torch

from sslforge import distributed
from sslforge.config import save_config
from sslforge.launcher.env import init_distributed
from sslforge.trainer.checkpoint import MODEL_FILE, _rng_state, _set_rng_state, load_module_weights, write_error
from sslforge.trainer.loop import Trainer
from sslforge.trainer.safe_load import (CheckpointError, UnsafeCheckpointError, deepspeed_globals, load_data,
                                        load_error, weights_only_loads)
from tests.dist_harness import run_ranks
from tests.test_cli import sslforge
from tests.trainer_fixtures import FixedLoader, global_batch, local_slice, tiny_config

BATCH = 8
OPTIM_RANK1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


class Hostile:
    """Unpickling this runs code: it writes the sentinel file."""

    def __init__(self, sentinel: Path | str) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple:
        return exec, (f"open({self.sentinel!r}, 'w').write('ran')",)


def _trainer(run_dir: str, *overrides: str) -> Trainer:
    """2 ranks, ZeRO-1 (so each rank has its own optimiser file), checkpoints at steps 2 and 4."""
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", "engine.zero_stage=1", "train.steps=6",
                      "train.ckpt_every_steps=2", "train.log_every_steps=100", *overrides)
    world, rank = distributed.world_size(), distributed.rank()
    loader = FixedLoader([local_slice(global_batch(BATCH, seed=i), rank, world) for i in range(3)])
    return Trainer(cfg, init_distributed("gloo"), loader=loader)


def _on_rank0(fn: Callable[[], Any]) -> None:
    """Change the shared files on one rank, then let every rank see the change."""
    if distributed.rank() == 0:
        fn()
    distributed.barrier()


def _attempt(run_dir: str, *overrides: str) -> int | str:
    """The step a new trainer resumed at, or its checkpoint error."""
    try:
        return _trainer(run_dir, *overrides).pos.step
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ item 2: hostile files
def _hostile_resumes(run_dir: str, sentinel: str) -> list[int | str]:
    _trainer(run_dir).fit(stop_at_step=2)
    ckpt = Path(run_dir) / "checkpoints" / "step_00000002"
    outcomes = []
    for name in (MODEL_FILE, OPTIM_RANK1, "rng_rank1.pt"):
        original = (ckpt / name).read_bytes()
        _on_rank0(lambda: torch.save(Hostile(sentinel), ckpt / name))
        for resume in ("auto", str(ckpt)):
            outcomes.append(_attempt(run_dir, f"resume={resume}"))
        _on_rank0(lambda: (ckpt / name).write_bytes(original))
    outcomes.append(_attempt(run_dir))  # the restored checkpoint loads: the refusals were the files'
    return outcomes


def test_hostile_checkpoint_files_are_refused_on_every_rank(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    results = run_ranks(_hostile_resumes, 2, str(tmp_path / "run"), str(sentinel))
    assert results[0] == results[1]  # every rank reached the same decision
    *refusals, restored = results[0]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    for i, name in enumerate((MODEL_FILE, OPTIM_RANK1, "rng_rank1.pt")):
        for outcome in refusals[2 * i: 2 * i + 2]:
            assert isinstance(outcome, str) and outcome.startswith("UnsafeCheckpointError: refusing to load")
            assert str(ckpt / name) in outcome and "builtins.exec" in outcome
    assert restored == 2
    assert not sentinel.exists()


def test_eval_knn_refuses_a_hostile_checkpoint(tmp_path: Path, synth_data: dict) -> None:
    run_dir, sentinel = tmp_path / "run", tmp_path / "sentinel"
    save_config(tiny_config(run_dir), run_dir / "config.yaml")
    ckpt = run_dir / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    torch.save(Hostile(sentinel), ckpt / MODEL_FILE)
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    result = sslforge("eval", "knn", str(run_dir), "--train", synth_data["train"], "--val", synth_data["val"])
    assert result.returncode == 2
    assert result.stderr.startswith(f"sslforge: error: refusing to load {ckpt / MODEL_FILE}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not sentinel.exists()


def test_deepspeeds_own_loads_are_forced_to_weights_only(tmp_path: Path) -> None:
    """DeepSpeed passes weights_only=False; inside `weights_only_loads` that is overridden, for zip
    and legacy pickle files alike, and nothing stays changed afterwards."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    sentinel = tmp_path / "sentinel"
    torch.save(Hostile(sentinel), tmp_path / "zip.pt")
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump(Hostile(sentinel), f, protocol=2)
    before = (os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"), set(torch.serialization.get_safe_globals()))
    for name in ("zip.pt", "legacy.pt"):
        with pytest.raises(pickle.UnpicklingError) as refused, weights_only_loads():
            TorchCheckpointEngine().load(str(tmp_path / name), map_location="cpu")
        error = load_error(tmp_path / name, refused.value)  # how a refusal inside DeepSpeed is reported
        assert isinstance(error, UnsafeCheckpointError) and str(error).startswith(f"refusing to load {tmp_path / name}")
        assert "exec" in str(error)
    assert not sentinel.exists()
    assert (os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"), set(torch.serialization.get_safe_globals())) == before


def test_module_weights_skip_damaged_and_refuse_hostile(tmp_path: Path) -> None:
    root, sentinel = tmp_path / "checkpoints", tmp_path / "sentinel"
    weights = {"w": torch.arange(4.0)}
    for step in (1, 2, 3):
        (root / f"step_0000000{step}").mkdir(parents=True)
    torch.save({"module": weights}, root / "step_00000001" / MODEL_FILE)
    torch.save({"module": weights}, root / "step_00000002" / MODEL_FILE)
    data = (root / "step_00000002" / MODEL_FILE).read_bytes()
    (root / "step_00000002" / MODEL_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with open(root / "step_00000003" / MODEL_FILE, "wb") as f:  # not a torch file at all
        pickle.dump(Hostile(sentinel), f, protocol=2)
    loaded, ckpt = load_module_weights(tmp_path)
    assert ckpt == root / "step_00000001" and torch.equal(loaded["w"], weights["w"])
    torch.save(Hostile(sentinel), root / "step_00000003" / MODEL_FILE)
    with pytest.raises(UnsafeCheckpointError, match=str(root / "step_00000003" / MODEL_FILE)):
        load_module_weights(tmp_path)
    assert not sentinel.exists()


def test_rng_states_round_trip_as_plain_data(tmp_path: Path) -> None:
    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    _set_rng_state(load_data(tmp_path / "rng.pt"))
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []


def _unsafe_globals_per_config(out: str) -> dict[str, list[str]]:
    found = {}
    for stage in (0, 1, 2):
        for precision in ("fp32", "bf16"):
            run_dir = Path(out) / f"z{stage}_{precision}"
            _trainer(str(run_dir), f"engine.zero_stage={stage}", f"engine.precision={precision}").fit(stop_at_step=1)
            for f in sorted(run_dir.glob("checkpoints/step_*/*.pt")):
                found[f"{run_dir.name}/{f.name}"] = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    return found


def test_allow_list_is_exactly_what_deepspeed_stores(tmp_path: Path) -> None:
    """Every non-tensor type in real checkpoints of ZeRO 0/1/2 x fp32/bf16 is on the allow-list,
    and every entry of the list is needed by some file."""
    found = run_ranks(_unsafe_globals_per_config, 1, str(tmp_path))[0]
    assert len(found) == 6 * 2 + 4  # model + RNG files everywhere, optimiser files under ZeRO-1/2
    allowed = sorted(f"{t.__module__}.{t.__qualname__}" for t in deepspeed_globals())
    assert set().union(*found.values()) == set(allowed)
    assert all(g == [] for name, g in found.items() if "optim_states" not in name)


# ------------------------------------------------------------------ item 4: resume=auto
def _flat_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the module and of the optimiser (ZeRO partitions included), by path."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if torch.is_tensor(value):
            out[prefix] = value.detach().clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, (int, float)):
            out[prefix] = torch.tensor(value)

    walk("module", trainer.method.state_dict())
    walk("optimizer", trainer.engine.optimizer.state_dict())
    walk("rng", torch.get_rng_state())
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _damaged_resumes(run_dir: str) -> dict[str, Any]:
    _trainer(run_dir).fit(stop_at_step=4)
    root = Path(run_dir) / "checkpoints"
    newest, older = root / "step_00000004", root / "step_00000002"
    out: dict[str, Any] = {}
    _on_rank0(lambda: (root / "latest").write_text("step_00000009"))
    out["dangling_latest"] = _attempt(run_dir)
    _on_rank0(lambda: (root / "latest").write_bytes(b"\x00\xff garbage"))
    out["garbage_latest"] = _attempt(run_dir)
    _on_rank0(lambda: (root / "latest").write_text(newest.name))
    model = (newest / MODEL_FILE).read_bytes()
    _on_rank0(lambda: (newest / MODEL_FILE).write_bytes(model[: len(model) // 2]))
    out["truncated_newest"] = _attempt(run_dir)
    # A checkpoint that fails half-way on one rank: rank 1's optimiser file is a valid torch file
    # without the optimiser state, so rank 1 has loaded step 4's weights when it fails and rank 0
    # has loaded all of step 4. Both must end exactly as a clean load of step 2.
    optim = (newest / OPTIM_RANK1).read_bytes()
    _on_rank0(lambda: ((newest / MODEL_FILE).write_bytes(model), torch.save({}, newest / OPTIM_RANK1)))
    recovered = _trainer(run_dir)
    out["half_loaded"] = recovered.pos.step
    out["half_loaded_equals_older"] = _same(_flat_state(recovered),
                                            _flat_state(_trainer(run_dir, f"resume={older}")))
    _on_rank0(lambda: (older / MODEL_FILE).write_bytes(b"garbage"))
    out["none_loadable"] = _attempt(run_dir)
    _on_rank0(lambda: (newest / OPTIM_RANK1).write_bytes(optim))
    out["repaired"] = _attempt(run_dir)
    return out


def test_resume_auto_takes_the_newest_checkpoint_every_rank_loads(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    results = run_ranks(_damaged_resumes, 2, str(run_dir))
    assert results[0] == results[1]
    out, root = results[0], run_dir / "checkpoints"
    assert out["garbage_latest"] == out["dangling_latest"] == 4
    assert out["truncated_newest"] == out["half_loaded"] == 2
    assert out["half_loaded_equals_older"]
    assert out["none_loadable"].startswith(f"CheckpointError: no loadable checkpoint in {root} (")
    assert out["none_loadable"].endswith(f"move {root} away to start over, or use a new run_dir")
    assert out["repaired"] == 4
    err = capfd.readouterr().err
    assert f"{root / 'latest'} names 'step_00000009', which is not a checkpoint here" in err
    assert (f"skipped step_00000004: checkpoint file {root / 'step_00000004' / MODEL_FILE} is unreadable"
            in err)
    assert f"skipped step_00000004: {root / 'step_00000004'} cannot be loaded (KeyError" in err
    assert f"resuming from {root / 'step_00000002'}" in err


# ------------------------------------------------------------------ item 7: full disk
@contextmanager
def _disk_fills_up(rank: int, kind: str, marker: str) -> Iterator[None]:
    """On `rank`, torch.save into a path containing `marker` writes some bytes, then fails as a
    full disk does: with ENOSPC, or as torch's zip writer reports it (no errno, no free space)."""
    real_save, real_usage = torch.save, shutil.disk_usage

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if distributed.rank() != rank or marker not in str(f):
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 4096)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")

    torch.save = save
    if kind == "zip" and distributed.rank() == rank:
        shutil.disk_usage = lambda path: SimpleNamespace(total=1 << 30, used=(1 << 30) - 4096, free=4096)
    try:
        yield
    finally:
        torch.save, shutil.disk_usage = real_save, real_usage


def _full_disks(run_dir: str, faults: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """For each fault: train until the save at step 4 fails, then restart over a stale temporary."""
    root, outcomes = Path(run_dir) / "checkpoints", []
    for rank, kind in faults:
        trainer = _trainer(run_dir)
        with _disk_fills_up(rank, kind, "tmp-step_00000004"):
            try:
                trainer.fit()
                error = None
            except CheckpointError as exc:
                error = str(exc)
        out = {"error": error, "latest": (root / "latest").read_text(), "left": sorted(p.name for p in root.iterdir())}
        distributed.barrier()
        _on_rank0(lambda: (root / "tmp-step_00000006").mkdir())  # as a kill -9 mid-save leaves it
        _on_rank0(lambda: (root / "tmp-step_00000006" / MODEL_FILE).write_bytes(b"partial"))
        out["resumed"] = _attempt(run_dir)
        out["left_after_restart"] = sorted(p.name for p in root.iterdir() if p.name.startswith("tmp-"))
        outcomes.append(out)
    return outcomes


def test_full_disk_is_one_clear_error_and_the_previous_checkpoint_stays(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = run_ranks(_full_disks, 2, str(run_dir), [(1, "enospc"), (0, "zip")])
    assert results[0] == results[1]  # every rank reached the same decision
    tmp = run_dir / "checkpoints" / "tmp-step_00000004"
    for out in results[0]:
        assert out["error"].startswith(f"cannot write checkpoint {tmp}: no space left on device")
        assert out["latest"] == "step_00000002"
        assert "step_00000002" in out["left"] and not any(n.startswith("tmp-step") for n in out["left"])
        assert out["resumed"] == 2 and out["left_after_restart"] == []


def test_write_error_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tmp-step_00000020"
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3") from inner
    except RuntimeError as exc:
        assert str(write_error(path, exc)) == f"cannot write checkpoint {path}: disk quota exceeded"
    zip_error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")
    assert str(write_error(path, zip_error)).startswith(f"cannot write checkpoint {path}: RuntimeError: [enforce")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    assert str(write_error(path, zip_error)) == f"cannot write checkpoint {path}: no space left on device (0 KiB free)"
