"""Faults for the subprocess tests, injected at interpreter start: a test puts this directory on
PYTHONPATH (Python then imports this `sitecustomize`) and names the fault in the environment of
the processes it starts; only the rank named by SSLFORGE_FAULT_RANK is affected (a SLURM job
inherits the environment of the command that submitted it).

SSLFORGE_FAULT=enospc   that rank's first checkpoint write fails as on a full disk: torch.save, which
                        every checkpoint file goes through, raises OSError(ENOSPC)
SSLFORGE_FAULT=raise    that rank raises RuntimeError in training step SSLFORGE_FAULT_STEP
SSLFORGE_FAULT_MARK     a file created when the fault fires (the tests time the job's end from it)
"""
import errno
import os
from pathlib import Path


def _fired() -> None:
    Path(os.environ["SSLFORGE_FAULT_MARK"]).touch()


def _enospc_on_checkpoint_write() -> None:
    import torch

    save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "checkpoints" in str(f):
            _fired()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    torch.save = failing_save


def _raise_in_step(step: int) -> None:
    from sslforge.trainer.loop import Trainer

    train_step = Trainer._step

    def failing_step(self, batch):  # type: ignore[no-untyped-def]
        if self.pos.step == step:
            _fired()
            raise RuntimeError(f"injected fault in step {step}")
        return train_step(self, batch)

    Trainer._step = failing_step


# A SLURM task learns its RANK later (from SLURM_PROCID, in the job itself).
if os.environ.get("SSLFORGE_FAULT") and \
        os.environ.get("RANK", os.environ.get("SLURM_PROCID")) == os.environ.get("SSLFORGE_FAULT_RANK"):
    if os.environ["SSLFORGE_FAULT"] == "enospc":
        _enospc_on_checkpoint_write()
    elif os.environ["SSLFORGE_FAULT"] == "raise":
        _raise_in_step(int(os.environ["SSLFORGE_FAULT_STEP"]))
