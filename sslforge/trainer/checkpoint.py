"""Atomic checkpoints: written under a temporary tag, renamed once every rank is done.

`latest` is replaced atomically after the rename, so a crash mid-write never leaves a half
checkpoint behind `latest`; older checkpoints beyond `keep_last` are deleted afterwards.
Each rank also saves its own RNG states, so a resumed run draws the same random numbers.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslforge import distributed

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    """The tag named by `latest`, if that checkpoint is complete on disk."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (root / tag).is_dir() else None


def resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """A run directory, a checkpoints directory or one checkpoint -> (root, tag)."""
    for root in (path / "checkpoints", path):
        tag = latest_tag(root)
        if tag:
            return root, tag
    if TAG_RE.match(path.name) and path.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(f"no checkpoint found at {path}")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it at the same step."""
        tag, tmp_tag = tag_for(step), f"tmp-{tag_for(step)}"
        rank = distributed.rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        distributed.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), self.root / tmp_tag / f"rng_rank{rank}.pt")
        distributed.barrier()
        if rank == 0:
            final = self.root / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.root / tmp_tag, final)
            _atomic_write(self.root / "latest", tag)
            self._prune()
        distributed.barrier()
        return self.root / tag

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if TAG_RE.match(p.name))
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def load(self, engine: Any, root: Path, tag: str) -> dict[str, Any]:
        """Restore engine (model, optimiser) and this rank's RNG; returns the client state."""
        _, client_state = engine.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
        if client_state is None:
            raise RuntimeError(f"checkpoint {root / tag} could not be loaded")
        rng = root / tag / f"rng_rank{distributed.rank()}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return client_state


def load_module_weights(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full module state dict from a DeepSpeed checkpoint (ZeRO stage 0-2), for eval/export."""
    files = sorted((root / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states in {root / tag}")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]
