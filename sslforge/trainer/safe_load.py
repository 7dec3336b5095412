"""Reading checkpoint files as data only: tensors and plain values, never code to run.

Every checkpoint file sslforge reads, DeepSpeed's included, goes through here: a cheap static
check of the pickle names an offending file before any state is touched, and the load itself
uses torch's weights-only unpickler with an allow-list of exactly the non-tensor types DeepSpeed
stores. Evaluation and export read weights through `checkpoint.load_module_weights`, which uses it.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names the path and the cause."""


class UnsafeCheckpointError(CheckpointError):
    """A file would build objects off the allow-list (run code) when unpickled: never skipped."""


def deepspeed_globals() -> list[type]:
    """The non-tensor types DeepSpeed 0.19.8 pickles into its files, and nothing else.

    Found with `torch.serialization.get_unsafe_globals_in_checkpoint` over real checkpoints of
    ZeRO 0/1/2 x fp32/bf16 on 1 and 2 ranks: all three sit in the ZeRO-1/2 optimiser files
    (`optimizer_state_dict`); model-state files and sslforge's own files need none.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # ["loss_scaler"]
    from deepspeed.runtime.zero.config import ZeroStageEnum  # ["zero_stage"]
    from deepspeed.utils.tensor_fragment import fragment_address  # ["param_slice_mappings"][group][name]

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside reads data only, DeepSpeed's too (it passes weights_only=False).

    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's documented switch that overrides the argument of
    every call; its opposite is set aside meanwhile, since torch refuses both together.
    """
    switches = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in switches}
    os.environ[switches[0]] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def check_file(path: Path) -> None:
    """Raise unless `path` is a torch checkpoint whose pickle builds allowed types only.

    Reads the pickle's opcodes, not the tensors: cheap, and it names the offending file before
    any state is touched. The weights-only load that follows remains the guarantee.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # any failure to parse is a damaged file
        raise CheckpointError(f"checkpoint file {path} is unreadable ({one_line(exc)})") from None
    if unsafe:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it would call {', '.join(sorted(unsafe))}, which no "
            "sslforge checkpoint contains (a tampered file, or one from other software); nothing was loaded")


def load_data(path: Path) -> Any:
    """`path` checked, then unpickled as data only, on the CPU."""
    check_file(path)
    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise load_error(path, exc) from None


def load_error(path: Path, exc: Exception) -> CheckpointError:
    """A failed load as a CheckpointError naming `path`; a weights-only refusal is unsafe."""
    if isinstance(exc, CheckpointError):
        return exc
    refused = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\n|$)", str(exc))
    if refused:  # the weights-only unpickler met something the static check could not see
        return UnsafeCheckpointError(f"refusing to load {path}: {refused.group(1)[:200]}; nothing was loaded")
    return CheckpointError(f"{path} cannot be loaded ({one_line(exc)})")
