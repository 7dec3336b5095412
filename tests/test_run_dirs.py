"""A new experiment never resumes an old one (issue 15, item 2).

As reported: `train simclr_synth data.train=A`, then `data.train=B`, both in the default run
directory, loaded A's checkpoint, reused its wandb id and overwrote its config.yaml. The resume
guard compared `data.train` as a path only, so shards rewritten at the same path (`sslforge data
shards` into the same folder) passed it, and the resumed position pointed past the new epoch:
`skip_batches=5 outside [0, 4]`. And a different path was refused in the default directory, where
the user had named no directory to resume.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sslforge.config import load_config
from sslforge.data_pipeline.synth import write_synthetic
from sslforge.resume_guard import ResumeConflict, check_resume, save_run
from sslforge.run_dirs import data_label, default_base, place_run
from tests.process_helpers import SMALL, latest_step, train_steps
from tests.trainer_fixtures import TINY

TRAIN = ["data.val=null", "eval.every_epochs=0", *SMALL]


def _sslforge(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslforge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but its metrics and wandb logs, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "wandb" not in p.parts}


def _wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


def test_other_data_in_the_default_directory_gets_a_run_of_its_own(synth_data: dict, tmp_path: Path) -> None:
    """Two runs, data A then data B (a folder of the same name elsewhere): B starts fresh in a
    directory of its own, A's checkpoints, config.yaml and wandb run untouched; B's command again
    resumes B."""
    label = data_label(synth_data["train"])
    other = write_synthetic(str(tmp_path / "elsewhere" / label), n_train=64, n_val=16, image_size=16, seed=1)
    first = tmp_path / "runs" / f"simclr-synth-{label}"
    second = first.with_name(f"{first.name}-2")
    common = ["train", "simclr_synth", *TRAIN, "logging.wandb_mode=offline", "train.steps=3"]

    a = _sslforge(tmp_path, *common, f"data.train={synth_data['train']}")
    assert a.returncode == 0, a.stderr[-3000:]
    assert latest_step(first) == 3
    kept, wandb_a = _files(first), _wandb_ids(first)

    b = _sslforge(tmp_path, *common, f"data.train={other['train']}")
    assert b.returncode == 0, b.stderr[-3000:]
    assert f"sslforge: new run dir runs/{second.name}; not resuming runs/{first.name} (step_00000003), whose " \
           f"config differs: data.train {synth_data['train']} -> {other['train']}" in b.stderr
    assert "resuming from" not in b.stderr
    assert train_steps(second) == [1, 2, 3]  # from scratch
    assert _files(first) == kept and _wandb_ids(first) == wandb_a  # config.yaml, checkpoints: not a byte changed
    wandb_b = _wandb_ids(second)
    assert len(wandb_b) == 1 and not wandb_b & wandb_a

    again = _sslforge(tmp_path, *common, f"data.train={other['train']}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from runs/{second.name}/checkpoints/step_00000003" in again.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [first.name, second.name]
    assert _wandb_ids(second) == wandb_b  # the same wandb run goes on


def test_shards_rewritten_in_place_are_not_resumed(tmp_path: Path) -> None:
    """The guard's blind spot: the same `data.train` path, other shards. Before the fix the
    second command loaded the first run's step-5 checkpoint and crashed in the ranks with
    `skip_batches=5 outside [0, 4]`; now it is refused before anything is written."""
    data = tmp_path / "photos"
    write_synthetic(str(data), n_train=96, n_val=16, image_size=16, seed=0)  # 6 batches of 16 an epoch
    run_dir = tmp_path / "run"
    common = ["train", "simclr_synth", *TRAIN, "logging.wandb_mode=disabled", f"data.train={data / 'train'}",
              f"run_dir={run_dir}"]
    first = _sslforge(tmp_path, *common, "train.steps=5")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = _files(run_dir)

    shutil.rmtree(data)
    write_synthetic(str(data), n_train=64, n_val=16, image_size=16, seed=1)  # 4 batches
    second = _sslforge(tmp_path, *common, "train.steps=8", "allow_changes=[train.steps]")
    assert second.returncode == 2, second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"sslforge: error: cannot resume {run_dir} (step_00000005) with a changed config: "
                           f"data.train {data / 'train'} (other shards: 1 shard(s), ")
    assert "to resume it, keep the values saved in" in line and "give another run_dir" in line
    assert _files(run_dir) == kept


# ------------------------------------------------------------------ naming and placing, no training


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config("simclr_synth", [*TINY, *overrides])


@pytest.mark.parametrize("spec, label", [
    ("/data/in1k/train", "in1k"),
    ("/data/in1k/train/", "in1k"),
    ("/data/openimages/shards/train-{000000..000146}.tar", "openimages"),
    ("/home/me/my photos/000000.tar::/home/me/more/000000.tar", "my-photos"),
    ("shards", ""),
])
def test_data_label_skips_generic_folder_names(spec: str, label: str) -> None:
    assert data_label(spec) == label


def test_default_name_includes_data_given_on_the_command_line() -> None:
    assert default_base(_cfg(), []) == Path("runs/simclr-synth")  # the recipe's own data
    given = ["data.train=/data/in1k/train"]
    assert default_base(_cfg(*given), given) == Path("runs/simclr-synth-in1k")
    named = [*given, "name=mine"]
    assert default_base(_cfg(*named), named) == Path("runs/mine")  # a name chosen: used as is
    own = ["data.train=/data/synth/train"]
    assert default_base(_cfg(*own), own) == Path("runs/simclr-synth")  # the name says it already


def _saved(cfg, step: int | None = 10) -> Path:  # type: ignore[no-untyped-def]
    """`cfg`'s run directory with its config, shard fingerprint and a (content-free) checkpoint."""
    run_dir = Path(cfg.run_dir)
    save_run(cfg)
    if step is not None:
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    return run_dir


def test_placement_resumes_its_own_run_and_passes_over_others(synth_data: dict, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    data = [f"data.train={synth_data['train']}"]
    base = default_base(_cfg(*data), data)
    first = _cfg(*data)
    place_run(first, data)
    assert first.run_dir == str(base) and capsys.readouterr().err == ""
    _saved(first)

    same = _cfg(*data, "train.keep_last=3")  # a FREE key: the same run
    place_run(same, data)
    assert same.run_dir == str(base) and capsys.readouterr().err == ""

    longer = [*data, "train.epochs=8"]  # a change of course: another run unless consented to
    cfg = _cfg(*longer)
    place_run(cfg, longer)
    assert cfg.run_dir == f"{base}-2"
    assert capsys.readouterr().err.strip() == (
        f"sslforge: new run dir {base}-2; not resuming {base} (step_00000010), whose config differs: "
        "train.epochs 4 -> 8 (allow_changes=[train.epochs] resumes it instead)")
    consented = [*longer, "allow_changes=[train.epochs]"]
    cfg = _cfg(*consented)
    place_run(cfg, consented)
    assert cfg.run_dir == str(base)

    _saved(_cfg(*longer, f"run_dir={base}-2"), step=None)  # started, no checkpoint yet: still its directory
    wider = [*data, "model.proj_output_dim=32"]
    cfg = _cfg(*wider)
    place_run(cfg, wider)
    assert cfg.run_dir == f"{base}-3"
    assert f"not resuming {base} (step_00000010), whose config differs: model.proj_output_dim 16 -> 32" \
           in capsys.readouterr().err

    fresh = [*data, "resume=none"]  # from scratch: not over the checkpoints of the same config
    cfg = _cfg(*fresh)
    place_run(cfg, fresh)
    assert cfg.run_dir == f"{base}-3"
    assert "resume=none starts from scratch" in capsys.readouterr().err

    given = [*data, "train.epochs=8", f"run_dir={base}"]  # named explicitly: used as given, then refused
    cfg = _cfg(*given)
    place_run(cfg, given)
    assert cfg.run_dir == str(base)
    with pytest.raises(ResumeConflict, match=r"train.epochs 4 -> 8 would change the run's course \(allowed with "
                                             r"allow_changes=\[train.epochs\]\); to resume it, keep the values"):
        check_resume(cfg)


def test_a_copy_of_the_same_shards_resumes(synth_data: dict, tmp_path: Path) -> None:
    """The shards decide, not the path: a copy elsewhere is the same data."""
    run_dir = _saved(_cfg(f"data.train={synth_data['train']}", f"run_dir={tmp_path / 'run'}"))
    copy = tmp_path / "copy"
    shutil.copytree(synth_data["train"], copy)
    check_resume(_cfg(f"data.train={copy}", f"run_dir={run_dir}"))
    (copy / "train-000005.tar").unlink()
    with pytest.raises(ResumeConflict, match=rf"data.train {synth_data['train']} -> {copy} \(other shards: 6 "
                                             r"shard\(s\), [\d,]+ bytes -> 5 shard\(s\)"):
        check_resume(_cfg(f"data.train={copy}", f"run_dir={run_dir}"))
