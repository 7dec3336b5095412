"""Which rank am I? torchrun's variables, SLURM's (srun), or a lone process.

Every launch path ends here: torchrun and submitit export RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT; a bare `srun sslforge train` gets them from SLURM through submitit's
helper; a single process gets a loopback rendezvous of its own.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from sslforge import distributed

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_external_launcher() -> bool:
    """True when torchrun, submitit or srun with several tasks started this process."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def launched_rank() -> int:
    """This process's global rank as the external launcher set it (before any process group)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_rank_variables() -> None:
    """Fill torch.distributed's variables from SLURM, or for a single local process."""
    if all(v in os.environ for v in TORCH_VARS):
        return
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _skip_cpu_shm_extension() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`)
    when its process group starts: minutes per start where two environments share
    ~/.cache/torch_extensions, and impossible on a node without a compiler. Only DeepSpeed's
    inference all-reduce uses it; training collectives go through torch.distributed (gloo), so
    it is marked unavailable (DeepSpeed's own switch: the op table it consults before building)."""
    import sslforge.deepspeed_accelerator  # noqa: F401  (before deepspeed: picks its accelerator)
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str = "auto", timeout_min: int = 60) -> DistEnv:
    """Initialise the process group (through DeepSpeed, which the engine needs) for this rank."""
    import sslforge.deepspeed_accelerator  # noqa: F401  (before deepspeed: picks its accelerator)
    import deepspeed
    import torch.distributed as dist

    export_rank_variables()
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        _skip_cpu_shm_extension()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=chosen, timeout=timedelta(minutes=timeout_min),
                                   verbose=False)
    distributed.set_comm_device(device)  # every sslforge collective checks its tensors are here
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, chosen)
