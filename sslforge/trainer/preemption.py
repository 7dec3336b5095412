"""A process-wide stop request, set from signal handlers and honoured at step boundaries.

Signal handlers must not run collectives or write checkpoints (every rank has to save together),
so they only set a flag; the loop agrees on it across ranks, checkpoints at that exact step and
returns. SIGTERM (scancel, preemption, `kill`), SIGUSR1 and SIGINT (Ctrl-C) all ask for that
stop; a second SIGINT means "stop now": it raises KeyboardInterrupt, without a checkpoint.
"""
from __future__ import annotations

import signal
from types import FrameType

_stop = False


def request_stop(*_: object) -> None:
    """Ask the training loop to checkpoint and return at the next step boundary."""
    global _stop
    _stop = True


def stop_requested() -> bool:
    return _stop


def clear() -> None:
    global _stop
    _stop = False


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def install_handlers(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Route termination signals to `request_stop` (main thread only; no-op elsewhere)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _stop:  # Ctrl-C twice: the user will not wait for a checkpoint
            raise KeyboardInterrupt
        request_stop()

    for sig in signals:
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread
            return
