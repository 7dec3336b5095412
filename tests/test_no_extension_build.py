"""DeepSpeed on the CPU path builds no C++ extension: no compiler needed, nothing rebuilt per start.

Seen: DeepSpeed JIT-compiled its shared-memory all-reduce into ~/.cache/torch_extensions at every
process-group start (minutes where two environments share the cache; impossible on a node without
a compiler). A training step on 2 ranks must run with no compiler and an empty extensions cache,
and leave that cache empty.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_harness import run_ranks
from tests.trainer_fixtures import one_step


def test_training_step_needs_no_compiler_and_builds_nothing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "torch_extensions"
    cache.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setenv("CXX", "/bin/false")  # any attempt to compile fails
    monkeypatch.setenv("CC", "/bin/false")
    results = run_ranks(one_step, 2, str(tmp_path / "run"))
    assert all(r["finite"] for r in results)
    assert list(cache.iterdir()) == []
