"""Shared fixtures: the built-in synthetic dataset, written once per test session; and the check
that no process a test starts outlives it."""
from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import psutil
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TEST_TOKEN = "SSLFORGE_TEST_TOKEN"
LEAK_GRACE_S = 10.0  # what a killed job may take to be gone (SLURM's clean-up, data workers' polling)
# Started once per session by multiprocessing's spawn and forkserver start methods, by design.
SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _started_by(token: str) -> list[psutil.Process]:
    """Running processes whose environment carries `token`: everything the test started, the
    orphans of a killed parent included (they are no longer anybody's children)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (proc.pid != os.getpid() and proc.environ().get(TEST_TOKEN) == token
                    and proc.status() != psutil.STATUS_ZOMBIE
                    and not any(h in " ".join(proc.cmdline()) for h in SESSION_HELPERS)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(autouse=True)
def no_process_outlives_the_test() -> Iterator[None]:
    """Each test runs with a token in the environment its processes inherit; those still running
    `LEAK_GRACE_S` after it are killed and fail the test."""
    token = uuid.uuid4().hex
    os.environ[TEST_TOKEN] = token
    try:
        yield
    finally:
        del os.environ[TEST_TOKEN]
    deadline = time.monotonic() + LEAK_GRACE_S
    while (left := _started_by(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes started by this test outlived it:\n" + "\n".join(map(_kill, left))


RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextmanager
def rank_variables_kept() -> Iterator[None]:
    """Code that trains or evaluates in the pytest process itself (one rank, `init_distributed`)
    sets the rank variables; a later launcher would inherit them (submitit refuses a set
    MASTER_ADDR, and child ranks would bind the port this process's group listens on). They are
    put back as they were; the process group stays, and later in-process work reuses it. Every
    test gets this; a module or session fixture that works in-process uses it itself."""
    before = {k: os.environ.get(k) for k in RANK_VARIABLES}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def rank_variables_stay_with_the_test() -> Iterator[None]:
    with rank_variables_kept():
        yield


def _kill(proc: psutil.Process) -> str:
    """Kill a leftover (so it cannot disturb the next tests); returns what it was."""
    try:
        described = f"{proc.pid} {' '.join(proc.cmdline())[:200]}"
        proc.kill()
    except psutil.NoSuchProcess:
        described = f"{proc.pid} (gone while being killed)"
    return described


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sslforge.data_pipeline.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    return write_synthetic(str(out), n_train=512, n_val=256, image_size=16, seed=0, max_per_shard=100,
                           captions=True)  # the caption methods read them, the others ignore them


from tests.run_fixtures import linear_run, pretrained_run, shapes  # noqa: E402,F401  (session runs, shared)
