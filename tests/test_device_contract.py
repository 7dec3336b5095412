"""Collectives take tensors on the rank's device only (NCCL's rule), checked without a GPU.

Under gloo a host tensor handed to a collective works, so CI cannot see the bug that crashes the
first multi-GPU job. tests/emulated_device.py gives each rank an emulated accelerator and makes
every torch.distributed collective reject a tensor that is not on it, as NCCL does.
"""
from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sslforge
from sslforge import distributed
from sslforge.launcher.env import init_distributed
from sslforge.trainer.loop import Trainer
from tests import emulated_device
from tests.dist_harness import run_ranks
from tests.emulated_device import DEVICE, on_device
from tests.trainer_fixtures import tiny_config


# ------------------------------------------------------------ the whole path under the guard
def _train_checkpoint_eval(run_dir: str, train: str, val: str) -> dict:
    env = init_distributed("gloo")
    registered = distributed.comm_device() == env.device
    cfg = tiny_config(run_dir, f"data.train={train}", f"data.val={val}", "optim.batch_size=64",
                      "train.steps=1", "train.log_every_steps=1", "train.ckpt_every_steps=1",
                      "eval.batch_size=128", "eval.at_end=true")
    with emulated_device.emulated_device() as device:
        step = Trainer(cfg, replace(env, device=device)).fit().step
    return {"registered": registered, "step": step, "checked": dict(emulated_device.CHECKED)}


def test_train_checkpoint_and_knn_use_device_tensors_only(tmp_path: Path, synth_data: dict) -> None:
    """A training step, a checkpoint and a kNN evaluation on 2 ranks, every collective checked
    (sslforge's and DeepSpeed's): today's code handed host tensors to them (stop agreement,
    skipped-samples count, kNN gather and top-1), which NCCL rejects."""
    results = run_ranks(_train_checkpoint_eval, 2, str(tmp_path), synth_data["train"], synth_data["val"])
    assert all(r["registered"] for r in results)  # init_distributed registers env.device
    assert [r["step"] for r in results] == [1, 1]
    for r in results:  # the guard saw the collectives: the run did not go around it
        assert r["checked"].get("all_reduce", 0) > 0 and r["checked"].get("all_gather", 0) > 0
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in records if "loss" in r] == [0]
    top1 = [r["knn_top1"] for r in records if "knn_top1" in r]
    assert len(top1) == 1 and 0.0 <= top1[0] <= 100.0


# ------------------------------------------------------------------------- the gateway
def _rows(n: int, rank: int) -> torch.Tensor:
    return torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * rank


def _gateway() -> dict:
    env = init_distributed("gloo")
    rank = distributed.rank()
    with emulated_device.emulated_device() as device:
        errors = {}
        for name, call in [("all_reduce_sum", lambda: distributed.all_reduce_sum(torch.ones(2))),
                           ("gather_with_grad", lambda: distributed.gather_with_grad(torch.ones(2))),
                           ("torch.distributed.all_reduce", lambda: dist.all_reduce(torch.ones(2)))]:
            with pytest.raises(RuntimeError) as info:
                call()
            errors[name] = str(info.value)
        local = _rows((5, 2)[rank], rank)
        gathered = distributed.gather_uneven(local, chunk_bytes=2 * 3 * 4 * 2)  # 2 rows a round
        on_dev = distributed.gather_uneven(local.to(device))
        one_empty = distributed.gather_uneven(_rows((0, 3)[rank], rank))
        return {"errors": errors, "env_device": str(env.device),
                "any": distributed.any_rank(rank == 1), "none": distributed.any_rank(False),
                "sum": distributed.sum_over_ranks(rank + 0.5),
                "gathered": gathered, "gathered_on_host": not on_device(gathered), "one_empty": one_empty,
                "on_dev_matches": torch.equal(on_dev.cpu(), gathered), "on_dev_stays": on_device(on_dev)}


def test_gateway_checks_devices_and_builds_its_own_scalars() -> None:
    results = run_ranks(_gateway, 2)
    expected = torch.cat([_rows(5, 0), _rows(2, 1)])
    for r in results:
        assert r["env_device"] == "cpu"  # gloo ranks on the real CPU communicate on the host
        for name in ("all_reduce_sum", "gather_with_grad"):  # the gateway's own message
            assert r["errors"][name].startswith(f"{name}: tensor on cpu, but this rank's collectives run on cpu:0")
        assert "NCCL takes only tensors on the rank's device" in r["errors"]["torch.distributed.all_reduce"]
        assert (r["any"], r["none"], r["sum"]) == (True, False, 2.0)
        assert torch.equal(r["gathered"], expected) and r["gathered_on_host"]  # 3 rounds of 2 rows each
        assert r["on_dev_matches"] and r["on_dev_stays"]
        assert torch.equal(r["one_empty"], _rows(3, 1))


SCANNED = emulated_device.COLLECTIVES + ("barrier", "monitored_barrier", "batch_isend_irecv", "all_gather_object",
                                         "broadcast_object_list", "gather_object", "scatter_object_list")


def _calls_to_collectives(source: str) -> list[str]:
    """`name` for every torch.distributed / deepspeed.comm collective the module calls or imports."""
    modules = {"torch.distributed", "torch.distributed.distributed_c10d", "deepspeed.comm"}
    tree = ast.parse(source)
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in modules and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found += [a.name for a in node.names if a.name in SCANNED]
        elif isinstance(node, ast.ImportFrom):
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in modules}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in SCANNED:
            owner = ast.unparse(node.value)
            if owner in aliases or owner in modules:
                found.append(node.attr)
    return found


def test_scanner_finds_direct_collectives() -> None:
    source = ("import torch.distributed as dist\nimport torch\nfrom deepspeed import comm\n"
              "from torch.distributed import broadcast\n"
              "dist.all_reduce(x)\ntorch.distributed.all_gather(a, b)\ncomm.barrier()\n"
              "dist.all_gather_object(out, obj)\n"
              "from sslforge import distributed\ndistributed.barrier()\n")
    assert sorted(_calls_to_collectives(source)) == ["all_gather", "all_gather_object", "all_reduce", "barrier",
                                                     "broadcast"]


def test_no_collective_outside_the_gateway() -> None:
    """Every collective sslforge calls goes through sslforge.distributed, which checks devices."""
    package = Path(sslforge.__file__).parent
    offenders = {str(p.relative_to(package)): calls for p in sorted(package.rglob("*.py"))
                 if p.name != "distributed.py" or p.parent != package
                 if (calls := _calls_to_collectives(p.read_text()))}
    assert offenders == {}


# ---------------------------------------------------------------------- the emulation
class _DoubleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.seen = (on_device(grad), on_device(grad.t().contiguous()))
        return grad * 2


def test_emulation_tracks_placement_like_a_gpu() -> None:
    """The rules the contract test relies on, each with the answer a CUDA device gives."""
    with emulated_device._Placement():
        host = torch.ones(4, 3)
        dev = host.to(DEVICE)
        assert not on_device(host) and on_device(dev) and dev is not host  # a transfer copies
        assert dev.device == DEVICE and host.device == torch.device("cpu")
        assert on_device(dev * 2 + 1) and on_device(torch.zeros(2, device=dev.device))
        assert on_device(dev.new_zeros(3)) and on_device(torch.empty_like(dev))
        assert not on_device(dev.cpu()) and not on_device(dev.to("cpu")) and not on_device(torch.zeros(2))
        host.add_(dev)  # in-place: stays where it was
        assert not on_device(host)
        with pytest.raises(TypeError, match="numpy"):
            dev.numpy()
        model = torch.nn.Linear(3, 2).to(DEVICE)
        assert on_device(model.weight) and on_device(model.bias)
        x = torch.randn(4, 3, requires_grad=True)
        y = _DoubleGrad.apply(model(x.to(DEVICE)))
        y.sum().backward()
        assert on_device(model.weight.grad) and not on_device(x.grad)
        assert y.grad_fn.seen == (True, True)  # gradient and the backward's own ops on the device
