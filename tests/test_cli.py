"""The CLI fails before any rank starts, with one line naming the bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def sslforge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


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
