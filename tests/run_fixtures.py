"""Real runs shared by the tests of what users do after pretraining (kNN against random init,
linear probe, export, test-time adaptation, report): trained once per session through the CLI,
as a user would, so each test reads a real run directory (config.yaml, checkpoints,
metrics.jsonl, wandb's offline files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sslforge.data_pipeline.synth import write_synthetic

PRETRAIN_STEPS = 200  # SimCLR on the shapes: kNN top-1 about 38% at random init -> about 90% (README)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The built-in shapes at their default 32 px, large enough for SimCLR to learn in 200 steps."""
    return write_synthetic(str(tmp_path_factory.mktemp("shapes")), n_train=6000, n_val=1000, seed=1)


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory, shapes: dict[str, str]) -> Path:
    """`simclr_synth` trained for 200 steps on 2 local ranks, evaluated (kNN) at its end."""
    from tests.test_cli import sslforge

    run_dir = tmp_path_factory.mktemp("pretrained") / "simclr"
    trained = sslforge("train", "simclr_synth", f"data.train={shapes['train']}", f"data.val={shapes['val']}",
                       f"run_dir={run_dir}", f"train.steps={PRETRAIN_STEPS}", "eval.every_epochs=0", "eval.at_end=true",
                       "logging.progress=false", "--nproc", "2", timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def linear_run(tmp_path_factory: pytest.TempPathFactory, pretrained_run: Path, shapes: dict[str, str]) -> Path:
    """`sslforge eval linear` on `pretrained_run`: `eval/linear_synth` (cached features, 10 epochs,
    about 85% top-1); a run directory whose method's `classifier()` is the frozen encoder + head."""
    from tests.test_cli import sslforge

    run_dir = tmp_path_factory.mktemp("linear") / "probe"
    probed = sslforge("eval", "linear", str(pretrained_run), "--train", shapes["train"], "--val", shapes["val"],
                      "--recipe", "eval/linear_synth", "--out", str(run_dir), "logging.progress=false", timeout=600)
    assert probed.returncode == 0, probed.stderr[-3000:]
    return run_dir
