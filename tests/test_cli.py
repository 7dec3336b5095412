"""The CLI fails before any rank starts, with one line naming the bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def sslforge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m sslforge.cli ARGS`; still running after `timeout` s, it fails the test with the
    Python stacks of its ranks (which dump them on SIGUSR1), so a hang in CI says where it is."""
    with subprocess.Popen([sys.executable, "-m", "sslforge.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            err = _stacks_then_kill(proc)
            pytest.fail(f"sslforge {' '.join(args)} still running after {timeout:g} s; its output and its "
                        f"ranks' stacks:\n{err[-8000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stacks_then_kill(proc: subprocess.Popen) -> str:
    """SIGUSR1 to every rank this test started, a moment for their stacks, then SIGKILL to all."""
    from tests.conftest import TEST_TOKEN, _kill, _started_by

    started = _started_by(os.environ[TEST_TOKEN])
    for rank in started:
        if "sslforge.launcher.worker" in " ".join(rank.cmdline()):
            rank.send_signal(signal.SIGUSR1)
    time.sleep(3)
    for leftover in [psutil.Process(proc.pid), *started]:
        _kill(leftover)
    return proc.communicate()[1]


@pytest.mark.parametrize("override, named", [
    ("optim.batchsize=256", "optim.batchsize"),
    ("model.backbone_name=resnet18", "model.backbone_name"),
    ("optim.name=rmsprop", "optim.name"),
    ("train.epochs=many", "train.epochs"),
    ("data.mode=streaming", "data.mode"),
    ("engine.zero_stage=3", "engine.zero_stage"),
    ("method.temprature=0.5", "method.temprature"),
])
def test_config_errors_name_the_key_and_start_nothing(tmp_path: Path, override: str, named: str) -> None:
    run_dir = tmp_path / "run"
    result = sslforge("train", "simclr_synth", override, f"run_dir={run_dir}", "--nproc", "2")
    assert result.returncode == 2
    assert named in result.stderr
    assert result.stderr.startswith("sslforge: error:") and len(result.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_lars_refuses_zero_partitioning(tmp_path: Path) -> None:
    result = sslforge("train", "simclr_synth", "optim.name=lars", "engine.zero_stage=2", f"run_dir={tmp_path}")
    assert result.returncode == 2 and "engine.zero_stage" in result.stderr and "LARS" in result.stderr


def test_unknown_recipe_lists_known_ones() -> None:
    result = sslforge("train", "simclr_typo")
    assert result.returncode == 2
    assert "unknown recipe 'simclr_typo'" in result.stderr and "simclr_synth" in result.stderr


def test_missing_shard_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "train-{000000..000003}.tar"
    result = sslforge("train", "simclr_synth", f"data.train={missing}", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert str(tmp_path / "nowhere") in result.stderr


def test_batch_not_divisible_by_ranks(tmp_path: Path) -> None:
    result = sslforge("train", "simclr_synth", "optim.batch_size=129", f"run_dir={tmp_path}", "--nproc", "2")
    assert result.returncode == 2 and "optim.batch_size" in result.stderr


def test_recipes_lists_simclr() -> None:
    result = sslforge("recipes")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"simclr", "simclr_800ep", "simclr_synth"} <= set(names)
