"""What a user sees before and around a run: bad values refused in the launching process (exit 2,
in seconds, nothing started), view list items overridable, `--help` without torch,
`--print-config`, help on every argument, a warm-up longer than the run named, images/s in the
progress bar, and evaluation every N epochs plus once at the end (never twice, never with
`eval.every_epochs=0` unless `eval.at_end=true`)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sslforge.config import ConfigError, load_config
from tests.dist_harness import run_ranks
from tests.test_cli import sslforge
from tests.trainer_fixtures import FixedLoader, global_batch, local_slice, tiny_config

LAUNCH_CHECK_S = 10  # the bound: an error a user can fix in seconds, not after the ranks start


@pytest.mark.parametrize("override, named", [
    (["model.backbone=vit_huge"], "model.backbone"),  # unknown: the config's own check
    # known, but the method's constructor refuses it: only building the networks can tell
    (["model.backbone=vit_tiny", "recipe=directclr"], "directclr_dims"),
])
def test_a_bad_value_fails_in_the_launching_process_in_seconds(tmp_path: Path, synth_data: dict,
                                                               override: list[str], named: str) -> None:
    recipe = next((o.split("=")[1] for o in override if o.startswith("recipe=")), "simclr_synth")
    values = [o for o in override if not o.startswith("recipe=")]
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = sslforge("train", recipe, f"data.train={synth_data['train']}", f"run_dir={run_dir}", *values,
                      "--nproc", "2", timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("sslforge: error:") and len(result.stderr.strip().splitlines()) == 1
    assert named in result.stderr
    assert not run_dir.exists()  # no rank started, nothing written
    assert took < LAUNCH_CHECK_S, f"took {took:.1f} s"


def test_view_items_override_the_methods_own_views_or_are_refused_by_name() -> None:
    # supervised_synth leaves data.views to the method (one DeiT crop): its items are overridable
    cfg = load_config("supervised_synth", ["data.train=x", "data.views.0.size=12", "data.views[0].flip_p=0"])
    assert [(v.size, v.flip_p, list(v.scale)) for v in cfg.data.views] == [(12, 0.0, [0.08, 1.0])]
    # the method's views at the final image size and options, the item's own value kept
    cfg = load_config("dino_synth", ["data.train=x", "data.image_size=64", "data.views.2.count=4"])
    assert [(v.size, v.count) for v in cfg.data.views] == [(64, 1), (64, 1), (32, 4)]
    with pytest.raises(ConfigError, match=r"data\.views\.3\.size.*1 view"):
        load_config("supervised_synth", ["data.train=x", "data.views.3.size=12"])
    with pytest.raises(ConfigError, match="unknown config key 'data.views.0.sizee'"):
        load_config("supervised_synth", ["data.train=x", "data.views.0.sizee=12"])


def test_help_imports_no_torch() -> None:
    code = ("import sys\nfrom sslforge.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['data', 'shards', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: sslforge train" in done.stdout and done.stderr.strip() == "False"


def test_every_argument_has_help() -> None:
    from sslforge.cli import _parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {action.option_strings or action.dest}")

    walk(_parser(), "sslforge")
    assert not missing


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = sslforge("train", "simclr_synth", "data.train=/data/x-{000..009}.tar", "method.temperature=0.3",
                      f"run_dir={run_dir}", "--print-config", timeout=60)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["method"]["temperature"] == 0.3 and printed["run_dir"] == str(run_dir)
    assert printed["data"]["views"][0]["size"] == printed["data"]["image_size"]  # resolved, not ${...}
    assert not run_dir.exists()  # shard paths are not even looked at: a config to read, not a run


def test_images_per_second_column_is_steps_per_second_times_the_global_batch() -> None:
    from rich.progress import Progress

    from sslforge.trainer.monitor import ImagesPerSecond

    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    column = ImagesPerSecond(global_batch=128)
    with Progress(column, get_time=lambda: next(clock), disable=True) as progress:
        task = progress.add_task("run", total=10)
        progress.update(task, completed=0)
        progress.update(task, completed=3)  # at t=1, 2, 3 s: 3 steps a second
        progress.update(task, completed=6)
        progress.update(task, completed=9)
        assert str(column.render(progress.tasks[0])) == f"{3 * 128:,.0f} img/s"


def test_a_warmup_longer_than_the_run_is_named() -> None:
    from sslforge.trainer.group_rules import warmup_warnings

    cfg = load_config("simclr_synth", ["data.train=x", "optim.warmup_epochs=10"])
    (line,) = warmup_warnings(cfg, total_steps=30, steps_per_epoch=4)
    assert "optim.warmup_epochs=10 is 40 steps" in line and "30" in line
    assert warmup_warnings(cfg, total_steps=41, steps_per_epoch=4) == []
    assert warmup_warnings(load_config("simclr_synth", ["data.train=x", "optim.warmup_epochs=0"]), 1, 4) == []


EPOCH = 2  # batches per epoch of the fixed loader


def _evaluated_steps(run_dir: str) -> dict[str, list[int]]:
    """The steps `fit` evaluates at, for several `eval` settings (one rank, a 2-batch epoch)."""
    from sslforge import distributed
    from sslforge.launcher.env import init_distributed
    from sslforge.trainer.loop import Trainer

    env = init_distributed("gloo")
    cases = {"every epoch": ["train.epochs=2", "eval.every_epochs=1"],
             "off": ["train.epochs=2", "eval.every_epochs=0"],
             "only at the end": ["train.epochs=2", "eval.every_epochs=0", "eval.at_end=true"],
             "ends mid-epoch": ["train.steps=5", "eval.every_epochs=1"],
             "every 3 of 2 epochs": ["train.epochs=2", "eval.every_epochs=3"]}
    found = {}
    for name, overrides in cases.items():
        cfg = tiny_config(f"{run_dir}/{len(found)}", "optim.batch_size=8", *overrides)
        batches = [local_slice(global_batch(8, seed=i), distributed.rank(), env.world_size) for i in range(EPOCH)]
        trainer = Trainer(cfg, env, loader=FixedLoader(batches))
        steps: list[int] = []
        trainer.evaluate = lambda t=trainer, s=steps: s.append(t.pos.step)  # type: ignore[method-assign]
        trainer.fit()
        found[name] = steps
    return found


def test_evaluation_every_n_epochs_and_once_at_the_end(tmp_path: Path) -> None:
    (found,) = run_ranks(_evaluated_steps, 1, str(tmp_path))
    assert found == {"every epoch": [2, 4], "off": [], "only at the end": [4], "ends mid-epoch": [2, 4, 5],
                     "every 3 of 2 epochs": [4]}
