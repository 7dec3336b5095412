"""Resume with a changed config (issue 7, reliability 6): a key that changes what the checkpoint
means is refused before anything is written; a key that changes the run's course needs
`allow_changes`; the rest passes silently. Faults injected as seen: `optim.batch_size` and
`model.backbone` changed on `sslforge train` of an existing run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sslforge.config import Config, ConfigError, save_config
from sslforge.methods import METHODS
from sslforge.resume_guard import CLASSES, ResumeConflict, check_resume, flatten, key_class
from tests.test_cli import sslforge
from tests.trainer_fixtures import TINY, tiny_config

# Two steps per epoch: 64 samples drawn per epoch, global batch 32, one rank.
RUN = [*TINY, "data.mode=resampled", "data.samples_per_epoch=64", "optim.batch_size=32", "train.epochs=1",
       "train.log_every_steps=1"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(run_dir: Path, data: dict, *overrides: str):  # type: ignore[no-untyped-def]
    return sslforge("train", "simclr_synth", *RUN, f"data.train={data['train']}", f"run_dir={run_dir}", *overrides)


@pytest.fixture(scope="module")
def trained(synth_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = _train(run_dir, synth_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    return run_dir


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run directory, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _one_error_line(stderr: str) -> str:
    """The error: one line, the last; anything before it is a warning line about other keys."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("sslforge: error: "), stderr[-3000:]
    assert all(line.startswith("sslforge: warning: ") for line in lines[:-1]), stderr[-3000:]
    return lines[-1]


def test_changed_batch_or_backbone_is_refused_before_anything_is_written(run: Path, synth_data: dict) -> None:
    """Before the fix the batch-64 resume ran over the batch-32 run, and the backbone change
    rewrote config.yaml before failing, so `eval knn` then failed on the intact checkpoint."""
    before = _snapshot(run)
    for overrides, named in ((["optim.batch_size=64"], ["optim.batch_size 32 -> 64"]),
                             (["model.backbone=resnet18"], ["model.backbone resnet10 -> resnet18"]),
                             (["optim.batch_size=64", "model.backbone=resnet18", "train.epochs=3"],
                              ["optim.batch_size 32 -> 64", "model.backbone resnet10 -> resnet18",
                               "train.epochs 1 -> 3", "allow_changes=[train.epochs]"])):
        result = _train(run, synth_data, *overrides)
        assert result.returncode == 2, result.stderr[-3000:]
        line = _one_error_line(result.stderr)
        assert f"cannot resume {run} (step_00000002)" in line
        assert all(text in line for text in named), line
        assert f"to resume it, keep the values saved in {run / 'config.yaml'}; to start anew, give another " \
               "run_dir" in line  # both ways out
        assert _snapshot(run) == before  # config.yaml, checkpoints, metrics: not a byte changed
    knn = sslforge("eval", "knn", str(run), "--train", synth_data["train"], "--val", synth_data["val"],
                   "--workers", "0")
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert knn.stdout.startswith("knn_top1 ")


def test_more_epochs_need_consent_and_then_continue_from_the_checkpoint(run: Path, synth_data: dict) -> None:
    before = _snapshot(run)
    refused = _train(run, synth_data, "train.epochs=2")
    assert refused.returncode == 2
    line = _one_error_line(refused.stderr)
    assert "train.epochs 1 -> 2" in line and "allow_changes=[train.epochs]" in line
    assert _snapshot(run) == before

    allowed = _train(run, synth_data, "train.epochs=2", "allow_changes=[train.epochs]")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4]  # steps 1-2 not redone
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.train.epochs == 2 and list(saved.allow_changes) == ["train.epochs"]
    again = _train(run, synth_data, "train.epochs=2")  # the saved config now says 2: nothing changed
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_free_change_passes_silently(run: Path, synth_data: dict) -> None:
    result = _train(run, synth_data, "train.log_every_steps=5", "train.keep_last=1", "train.ckpt_every_steps=7",
                    "data.shuffle_buffer=10", "name=renamed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sslforge: error" not in result.stderr and "changed config" not in result.stderr
    assert OmegaConf.load(run / "config.yaml").train.keep_last == 1


def test_resume_none_over_existing_checkpoints_is_refused(run: Path, synth_data: dict) -> None:
    before = _snapshot(run)
    result = _train(run, synth_data, "resume=none")
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "already holds checkpoints (step_00000002)" in line and "resume=none" in line
    assert _snapshot(run) == before


def test_slurm_launch_refuses_before_submitting(run: Path, synth_data: dict) -> None:
    """`launch --slurm` compares the same way, dry run included (no SLURM needed to refuse)."""
    before = _snapshot(run)
    result = sslforge("launch", "simclr_synth", *RUN, f"data.train={synth_data['train']}", f"run_dir={run}",
                      "optim.batch_size=64", "slurm.gpus_per_node=0", "slurm.tasks_per_node=2",
                      "--slurm", "--dry-run")
    assert result.returncode == 2
    assert "optim.batch_size 32 -> 64" in _one_error_line(result.stderr)
    assert _snapshot(run) == before


# ------------------------------------------------------------------ the table and the checks


def test_every_schema_key_is_in_exactly_one_class() -> None:
    """A key added to the schema must be classified here (unclassified keys count as NEVER)."""
    listed = {entry for keys in CLASSES.values() for entry in keys}
    matched: set[str] = set()
    for method in METHODS.values():
        schema = OmegaConf.to_container(OmegaConf.structured(Config(method=method.config_class())))
        for key in flatten(schema):
            parts = key.split(".")
            prefixes = {".".join(parts[:end]) for end in range(1, len(parts) + 1)}
            hits = [name for name, keys in CLASSES.items() if prefixes & keys]
            assert len(hits) == 1, (key, hits)
            matched |= prefixes & listed
    assert listed == matched, f"entries naming no schema key: {sorted(listed - matched)}"


def test_key_classes_follow_the_issue() -> None:
    for key in ("optim.batch_size", "model.backbone", "method.temperature", "method.name", "data.train",
                "data.image_size", "engine.zero_stage", "optim.name", "train.seed"):
        assert key_class(key) == "never", key
    for key in ("train.epochs", "train.steps", "optim.base_lr", "optim.warmup_epochs", "engine.precision",
                "engine.grad_clip"):
        assert key_class(key) == "consent", key
    for key in ("logging.wandb_mode", "eval.knn_k", "slurm.nodes", "data.num_workers", "train.keep_last",
                "run_dir", "resume", "allow_changes"):
        assert key_class(key) == "free", key
    assert key_class("engine.some_future_key") == "never"  # unclassified: the safe side
    assert key_class("optim.parts.generator.name") == "never"  # a part's optimiser state layout
    assert key_class("optim.parts.generator.base_lr") == "consent"
    assert key_class("optim.parts.generator.every") == "consent"  # the update ratio


def _saved_run(tmp_path: Path, *overrides: str) -> Path:
    """A run directory with a saved config and a (content-free) checkpoint, without training."""
    run_dir = tmp_path / "run"
    save_config(tiny_config(run_dir, "optim.batch_size=32", *overrides), run_dir / "config.yaml")
    (run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000010")
    return run_dir


def test_resume_path_is_compared_with_the_run_that_wrote_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _saved_run(tmp_path)
    ckpt = source / "checkpoints" / "step_00000010"
    elsewhere = tmp_path / "new"
    with pytest.raises(ResumeConflict, match=r"optim.batch_size 32 -> 64 would change what the checkpoint"):
        check_resume(tiny_config(elsewhere, "optim.batch_size=64", f"resume={ckpt}"))
    check_resume(tiny_config(elsewhere, "optim.batch_size=32", f"resume={ckpt}", "train.keep_last=9"))
    with pytest.raises(ResumeConflict, match="no such checkpoint"):
        check_resume(tiny_config(elsewhere, f"resume={tmp_path / 'missing'}"))
    check_resume(tiny_config(tmp_path / "fresh", "optim.batch_size=64"))  # nothing to resume: no check
    bare = tmp_path / "copied" / "step_00000010"  # a checkpoint without its run's config
    bare.mkdir(parents=True)
    check_resume(tiny_config(elsewhere, "optim.batch_size=64", f"resume={bare}"))
    assert "cannot be compared" in capsys.readouterr().err


def test_allow_changes_must_name_a_key_that_may_change(tmp_path: Path) -> None:
    run_dir = _saved_run(tmp_path)
    with pytest.raises(ConfigError, match="'optim.batch_size' can never change on resume"):
        check_resume(tiny_config(run_dir, "optim.batch_size=64", "allow_changes=[optim.batch_size]"))
    with pytest.raises(ConfigError, match="'train.epoch' is not a config key"):
        check_resume(tiny_config(run_dir, "allow_changes=[train.epoch]"))
    check_resume(tiny_config(run_dir, "optim.batch_size=32", "optim.base_lr=0.1", "engine.precision=bf16",
                             "allow_changes=[optim.base_lr,engine.precision]"))
