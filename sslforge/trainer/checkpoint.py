"""Atomic checkpoints, written together by every rank and read back as data only.

A checkpoint is written under `tmp-step_N`, renamed to `step_N` once every rank is done, then
`latest` is replaced atomically; older checkpoints beyond `keep_last` are deleted afterwards. A
crash mid-write never leaves a half checkpoint behind `latest`, and what it leaves (`tmp-*`) is
removed at the next start. Each rank also saves its RNG states, so a resumed run draws the same
random numbers.

Every decision about a checkpoint (a write failed, a file cannot be loaded) is taken by all ranks
together: one rank raising alone would leave the others waiting in the next collective.
Every file is read as data only, DeepSpeed's own loads included (`safe_load.py`): a checkpoint
can hold tensors and plain values, never code to run.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from sslforge import distributed
from sslforge.trainer.safe_load import (CheckpointError, UnsafeCheckpointError, check_file, load_data,
                                         load_error, one_line, weights_only_loads)

TAG_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = "tmp-"
MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name; sslforge uses no model parallelism
LOW_SPACE_BYTES = 64 << 20  # below this, a failed write is put down to a full filesystem
T = TypeVar("T")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------ RNG states as plain data
def _rng_state() -> dict[str, Any]:
    """Tensors, ints and tuples only, so the file loads with weights_only=True."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ decisions all ranks share
def _gather_errors(error: CheckpointError | None) -> list[CheckpointError]:
    """Every rank's error, in rank order, on every rank (object collectives pick the backend's
    device themselves, so this holds under NCCL too)."""
    return [e for e in distributed.all_gather_object(error) if e is not None]


def _agreed(fn: Callable[[], T]) -> T:
    """`fn()` on every rank; when it raised a CheckpointError on any rank, the same error on all
    (an unsafe file's first), so every rank takes the same path."""
    result, error = None, None
    try:
        result = fn()
    except CheckpointError as exc:
        error = exc
    errors = _gather_errors(error)
    if errors:
        raise next((e for e in errors if isinstance(e, UnsafeCheckpointError)), errors[0])
    return result  # type: ignore[return-value]


def _from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0, its result (or CheckpointError) on every rank: one view of the files."""
    box: list[Any] = [None]
    if distributed.rank() == 0:
        try:
            box[0] = fn()
        except CheckpointError as exc:
            box[0] = exc
    result = distributed.broadcast_object(box[0], src=0)
    if isinstance(result, CheckpointError):
        raise result
    return result


def _say(lines: list[str]) -> None:
    """What was loaded and what was passed over, once per job."""
    if distributed.rank() == 0:
        for line in lines:
            print(f"sslforge: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ finding checkpoints
@dataclass
class Candidates:
    """Checkpoints to try, best first: the one `latest` names, then the others newest first."""

    root: Path
    tags: list[str]
    notes: list[str]  # why something that looked like a checkpoint is not among `tags`
    has_pointer: bool  # a `latest` file exists: a run has checkpointed here before


def find_checkpoints(path: Path) -> Candidates:
    """Candidates at a run directory, a checkpoints directory or one `step_N` checkpoint."""
    if TAG_RE.match(path.name):
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at {path}")
        return Candidates(path.parent, [path.name], [], True)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = sorted((p.name for p in root.glob("step_*") if TAG_RE.match(p.name) and p.is_dir()), reverse=True)
    pointer, notes = root / "latest", []
    if pointer.is_file():
        named = pointer.read_text(errors="replace").strip()
        if named in tags:
            tags.insert(0, tags.pop(tags.index(named)))
        else:
            notes.append(f"{pointer} names {named[:40]!r}, which is not a checkpoint here")
    return Candidates(root, tags, notes, pointer.is_file())


def first_loadable(found: Candidates, load: Callable[[Path], T], action: str, hint: str) -> tuple[T, Path]:
    """`load` of the best candidate that loads, saying which and why others were passed over.

    A damaged or incomplete checkpoint is skipped; an unsafe file stops everything.
    """
    notes = list(found.notes)
    for tag in found.tags:
        try:
            result = load(found.root / tag)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            notes.append(f"skipped {tag}: {exc}")
            continue
        _say([*notes, f"{action} {found.root / tag}"])
        return result, found.root / tag
    reasons = "; ".join(notes) or "it holds none"
    raise CheckpointError(f"no loadable checkpoint in {found.root} ({reasons}); {hint}")


def load_module_weights(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The module state dict of the best loadable checkpoint at `source`, read as data only.

    The one way evaluation and export read weights (ZeRO stage 0-2 keep them whole in the model
    file). Returns the weights and the checkpoint directory they came from.
    """
    def module_of(ckpt: Path) -> dict[str, torch.Tensor]:
        state = load_data(ckpt / MODEL_FILE)
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise CheckpointError(f"{ckpt / MODEL_FILE} holds no module weights")
        return state["module"]

    return first_loadable(find_checkpoints(source), module_of, "loading weights from",
                          "pass a run directory or checkpoint that loads")


# ------------------------------------------------------------------ writing
def _free_bytes(path: Path) -> int | None:
    for parent in (path, *path.parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def write_error(path: Path, exc: BaseException) -> CheckpointError:
    """One line naming the path and the cause, the errno's text when the chain carries one.

    torch's zip writer reports a full disk as "unexpected pos" and drops the errno, so free
    space on the filesystem (measured before the partial files go) decides that case.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return CheckpointError(f"cannot write checkpoint {path}: {os.strerror(seen.errno).lower()}")
        seen = seen.__cause__ or seen.__context__
    free = _free_bytes(path)
    if free is not None and free < LOW_SPACE_BYTES:
        return CheckpointError(f"cannot write checkpoint {path}: no space left on device "
                               f"({free // 1024} KiB free)")
    return CheckpointError(f"cannot write checkpoint {path}: {one_line(exc)}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    # ---------------------------------------------------------------- save
    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it at the same step.

        A failure on any rank (a full disk) becomes the same CheckpointError on every rank; the
        temporary is removed, the previous checkpoint and `latest` stay as they were.
        """
        tag = tag_for(step)
        tmp = self.root / (TMP_PREFIX + tag)
        self._settle(tmp, self._on_main(tmp, lambda: self._prepare(tmp)))
        self._settle(tmp, self._write(engine, tmp, client_state))
        self._settle(tmp, self._on_main(self.root / tag, lambda: self._publish(tmp, tag)))
        return self.root / tag

    def _prepare(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, engine: Any, tmp: Path, client_state: dict[str, Any]) -> CheckpointError | None:
        try:
            engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
        except Exception as exc:
            error = write_error(tmp, exc)
            # DeepSpeed 0.19.8 writes its files between its collectives: a rank whose write raised
            # skipped only save_checkpoint's closing barrier, where the other ranks now wait.
            distributed.barrier()
            return error
        try:
            torch.save(_rng_state(), tmp / f"rng_rank{distributed.rank()}.pt")
        except Exception as exc:
            return write_error(tmp, exc)
        return None

    def _publish(self, tmp: Path, tag: str) -> None:
        final = self.root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(self.root / "latest", tag)
        self._prune()

    def _on_main(self, path: Path, fn: Callable[[], None]) -> CheckpointError | None:
        if distributed.rank() != 0:
            return None
        try:
            fn()
        except Exception as exc:
            return write_error(path, exc)
        return None

    def _settle(self, tmp: Path, error: CheckpointError | None) -> None:
        """Go on together, or remove the temporary and raise the same error on every rank."""
        errors = _gather_errors(error)
        if not errors:
            return
        if distributed.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        raise errors[0]

    def _prune(self) -> None:
        """Rename, then delete: an interrupted delete leaves a `tmp-` directory, never a half `step_`."""
        tags = sorted(p.name for p in self.root.iterdir() if TAG_RE.match(p.name))
        for old in tags[: -self.keep_last]:
            doomed = self.root / (TMP_PREFIX + old)
            os.replace(self.root / old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def remove_temporaries(self) -> None:
        """Collective: rank 0 deletes what an interrupted save or prune left, before anything loads."""
        if distributed.rank() == 0 and self.root.is_dir():
            for leftover in self.root.glob(TMP_PREFIX + "*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        distributed.barrier()

    # ---------------------------------------------------------------- resume
    def resume(self, engine: Any, resume: str) -> dict[str, Any] | None:
        """Collective. Restore the checkpoint `resume` names; returns its client state, or None for
        a fresh start (`none`, or `auto` where no run has checkpointed yet).

        `auto` and a directory of checkpoints take the best one every rank can load; a checkpoint
        that fails on any rank is skipped by all, and the next one overwrites every module
        parameter and buffer (strict load) and the whole optimiser state, so nothing mixes.
        """
        self.remove_temporaries()
        if resume == "none":
            return None
        found = _from_main(lambda: find_checkpoints(self.root if resume == "auto" else Path(resume)))
        if not found.tags and not found.has_pointer:
            if resume == "auto":
                return None  # no run has checkpointed here yet
            raise CheckpointError(f"resume={resume}: no checkpoint there")
        hint = (f"move {found.root} away to start over, or use a new run_dir" if resume == "auto"
                else "pass a checkpoint that loads")
        state, _ = first_loadable(found, lambda ckpt: self.load(engine, ckpt), "resuming from", hint)
        return state

    def load(self, engine: Any, ckpt: Path) -> dict[str, Any]:
        """Collective: restore engine (model, optimiser) and this rank's RNG from `ckpt`, or raise
        the same CheckpointError on every rank."""
        rng = _agreed(lambda: self._check(engine, ckpt))  # before any state is touched
        state = _agreed(lambda: self._load_engine(engine, ckpt))
        if rng is not None:
            _set_rng_state(rng)
        return state

    def _check(self, engine: Any, ckpt: Path) -> dict[str, Any] | None:
        """Every file this rank will read exists and holds data only; returns its RNG state.

        A missing RNG file is allowed (a run resumed on more ranks than it was saved with).
        """
        rank = distributed.rank()
        check_file(ckpt / MODEL_FILE)
        if engine.zero_optimization_stage() > 0:
            check_file(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        rng = ckpt / f"rng_rank{rank}.pt"
        return load_data(rng) if rng.exists() else None

    def _load_engine(self, engine: Any, ckpt: Path) -> dict[str, Any]:
        try:
            with weights_only_loads():
                loaded, client_state = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                              load_lr_scheduler_states=False)
        except Exception as exc:
            raise load_error(ckpt, exc) from None
        if loaded is None or client_state is None:
            raise CheckpointError(f"{ckpt} cannot be loaded (DeepSpeed found no checkpoint there)")
        return client_state
