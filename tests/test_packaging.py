"""What a `pip install` user gets: a wheel of the project installed into a fresh environment and
run from another directory, so nothing can come from the repository checkout (its recipes, its
editable install). The heavy dependencies come from this environment's site-packages through a
plain path in a `.pth` file, which adds the directory without running the `.pth` hooks inside
it (the editable install's import finder among them)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from sslforge.config import ConfigError, load_config
from tests.process_helpers import train_args

ROOT = Path(__file__).resolve().parent.parent
# A user's own recipes: one inherits a packaged recipe by name, the other its sibling file.
USER_RECIPES = {
    "base.yaml": "inherits: simclr_synth\noptim:\n  base_lr: 1.0e-3\n",
    "mine.yaml": "inherits: base\nname: mine\ntrain:\n  epochs: 1\n",
    "mine_by_file.yaml": "inherits: base.yaml\nname: mine-by-file\n",
}


def _run(cmd: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(cmd: list, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = _run(cmd, cwd, env)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` folder of a fresh venv with the project's wheel installed."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # built from a copy: a build in place would write build/ and egg-info into the checkout
    shutil.copytree(ROOT / "sslforge", src / "sslforge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _ok([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("sslforge-*.whl")
    venv = tmp / "venv"
    _ok([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    _ok([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", wheel], tmp)
    site = Path(_ok([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    tmp).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


@pytest.fixture
def user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_installed_package_is_the_wheel(installed: Path, tmp_path: Path, user_env: dict[str, str]) -> None:
    where = _ok([installed / "python", "-c", "import sslforge; print(sslforge.__file__)"], tmp_path, user_env)
    assert Path(where.strip()).is_relative_to(installed.parent)


def test_the_wheel_lists_and_trains_its_recipes(installed: Path, tmp_path: Path, user_env: dict[str, str],
                                                synth_data: dict) -> None:
    listed = _ok([installed / "sslforge", "recipes"], tmp_path, user_env)
    names = {line.split()[0] for line in listed.splitlines()}
    assert {"simclr", "simclr_synth", "eval/linear_in1k", "slurm/simclr_in1k"} <= names
    assert all(str(installed.parent) in line for line in listed.splitlines())

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _ok([installed / "sslforge", "--version"], tmp_path, user_env) == \
        f"sslforge {project['version']} (torch {version('torch')})\n"

    run_dir = tmp_path / "run"
    _ok([installed / "sslforge", *train_args(synth_data, run_dir, "train.steps=2")], tmp_path, user_env)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "latest").is_file()


def test_the_wheel_loads_a_users_recipe_files(installed: Path, tmp_path: Path, user_env: dict[str, str]) -> None:
    for name, text in USER_RECIPES.items():
        (tmp_path / name).write_text(text)
    show = ("from sslforge.config import load_config as load; import sys; "
            "c = load(sys.argv[1]); print(c.name, c.optim.base_lr, c.train.epochs, c.model.backbone)")
    assert _ok([installed / "python", "-c", show, "mine.yaml"], tmp_path, user_env).split() == \
        ["mine", "0.001", "1", "resnet10"]
    assert _ok([installed / "python", "-c", show, str(tmp_path / "mine_by_file.yaml")], tmp_path, user_env).split() \
        == ["mine-by-file", "0.001", "4", "resnet10"]


def test_a_missing_parent_names_the_recipe_and_the_parent(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("inherits: nowhere\n")
    with pytest.raises(ConfigError, match=r"child\.yaml.*'nowhere'"):
        load_config(str(child))


def test_no_recipes_found_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from sslforge import cli, config

    monkeypatch.setattr(config, "RECIPES_DIR", tmp_path)
    assert cli.main(["recipes"]) == 2
    assert "no recipes" in capsys.readouterr().err
