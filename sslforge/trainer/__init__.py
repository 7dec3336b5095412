"""The loop, the DeepSpeed engine, schedules, checkpoints and monitoring.

`run` and `TrainResult` are imported lazily: importing `sslforge.trainer.preemption` (from a
signal-handling launcher) should not pull in DeepSpeed.
"""
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("run", "Trainer", "TrainResult", "NonFiniteLossError"):
        from sslforge.trainer import loop

        return getattr(loop, name)
    raise AttributeError(name)
