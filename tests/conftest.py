"""Shared fixtures: the built-in synthetic dataset, written once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sslforge.data_pipeline.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    return write_synthetic(str(out), n_train=512, n_val=256, image_size=16, seed=0, max_per_shard=100)
