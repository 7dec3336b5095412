"""One reading rule for every config value, wherever it is written (issue 7, item E).

A value given in a recipe file, the same text given as `key=value`, and the run's saved
`config.yaml` must load to the same config, for every leaf key of the schema. YAML 1.1 read
`slurm.time=48:00:00` on the command line as the base-60 number 172800 (`--time=172800`, which
SLURM reads as 120 days) while the recipe kept the text.
"""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
from omegaconf import OmegaConf

from sslforge.config import _CHOICES, Config, ConfigError, load_config, load_resolved, save_config
from sslforge.config_effects import ineffective_overrides
from sslforge.methods.simclr import SimCLRConfig

# The recipe every case starts from: one explicit view, so list-item keys exist on both paths.
BASE = {"method": {"name": "simclr"},
        "data": {"train": "shards", "samples_per_epoch": "100", "views": [{"count": "2"}]},
        "optim": {"name": "adamw"}}

TRICKY = ["48:00:00", "1-00:00:00", "00:30", "00:30:00", "1e-6", "0x10", "010", "yes", "no", "on",
          "null", "~", '"quoted"', "[0.2, 1.0]", "", "2024-01-01"]
NONE_TEXTS = {"null", "~", ""}


class Leaf(typing.NamedTuple):
    path: tuple  # keys, and 0 for the first item of a list of sections
    kind: Any  # the schema's type annotation

    @property
    def key(self) -> str:
        return ".".join(map(str, self.path))


def _leaves(cls: type, prefix: tuple = ()) -> Iterator[Leaf]:
    """Every leaf of the structured config, descending into sections and list items."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = SimCLRConfig if (cls is Config and f.name == "method") else hints[f.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, (*prefix, f.name))
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(args[0]):
            yield from _leaves(args[0], (*prefix, f.name, 0))
        elif typing.get_origin(kind) is dict:
            continue  # optim.parts: only a PartsMethod takes them (tests/test_parts.py loads them)
        else:
            yield Leaf((*prefix, f.name), kind)


LEAVES = list(_leaves(Config))


def _base_type(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union else kind


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


SCALARS = {int: ("7", 7), float: ("0.25", 0.25), bool: ("false", False), str: ("some text-1", "some text-1")}


# Keys whose valid values depend on other keys (validate's cross-key rules), given a value that
# is valid with every other key's representative: image size 7, ZeRO stage 2.
CONSTRAINED = {"engine.grad_clip_mode": ("global", "global"), "model.backbone": ("vit_tiny", "vit_tiny"),
               "model.num_heads": ("3", 3), "model.small_stem": ("null", None),
               "method.loss": ("nt_xent", "nt_xent"), "method.fnc_mode": ("elimination", "elimination"),
               "data.views.0.count": ("2", 2),  # SimCLR takes two crops
               "data.views.0.geometry_of": ("null", None),  # view 0 has no earlier view to share
               "data.views.0.randaugment": ("rand-m7-n1", "rand-m7-n1"),
               "eval.inception_weights": ("null", None),  # a path is checked for the file (tests/test_text_eval.py)
               "eval.dual_encoder": ("null", None)}


def _representative(leaf: Leaf) -> tuple[str, Any]:
    """(text, the value it must load as), valid for the key."""
    if leaf.key == "method.name":
        return "simclr", "simclr"
    if leaf.key in CONSTRAINED:
        return CONSTRAINED[leaf.key]
    if leaf.key in _CHOICES:
        choice = _CHOICES[leaf.key][-1]
        return str(choice), choice
    base = _base_type(leaf.kind)
    if typing.get_origin(base) is list:
        text, value = SCALARS[typing.get_args(base)[0]]
        return f"[{text}, {text}]", [value, value]
    return SCALARS[base]


def _set(tree: dict, path: tuple, text: str) -> dict:
    tree = copy.deepcopy(tree)
    node: Any = tree
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[path[-1]] = text
    return tree


def _yaml(tree: Any, indent: int = 0) -> str:
    """Block YAML with every leaf written verbatim, as a user would type it."""
    pad, lines = " " * indent, []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key}:", _yaml(value, indent + 2)]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}:")
            for item in value:
                body = _yaml(item, indent + 4).splitlines()
                lines += [f"{pad}  - {body[0].strip()}", *body[1:]]
        else:
            lines.append(f"{pad}{key}: {value}".rstrip())
    return "\n".join(lines)


def _recipe(tmp_path: Path, tree: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(_yaml(tree) + "\n")
    return str(path)


def _outcome(recipe: str, overrides: list[str]) -> tuple[str, Any]:
    try:
        return "ok", OmegaConf.to_container(load_config(recipe, overrides), resolve=True)
    except ConfigError as exc:
        return "error", str(exc)


def _both_paths(tmp_path: Path, leaves: list[Leaf], texts: list[str]) -> tuple[tuple, tuple]:
    tree = BASE
    for leaf, text in zip(leaves, texts):
        tree = _set(tree, leaf.path, text)
    from_recipe = _outcome(_recipe(tmp_path, tree), [])
    overrides = [f"{leaf.key}={text}" for leaf, text in zip(leaves, texts)]
    from_overrides = _outcome(_recipe(tmp_path, BASE), overrides)
    return from_recipe, from_overrides


def test_every_leaf_key_loads_the_same_from_a_recipe_an_override_and_the_saved_config(tmp_path: Path) -> None:
    assert {"slurm.time", "method.temperature", "data.views.0.size", "data.views.0.scale"} <= {
        leaf.key for leaf in LEAVES}
    texts, expected = zip(*map(_representative, LEAVES))
    from_recipe, from_overrides = _both_paths(tmp_path, LEAVES, list(texts))
    assert from_recipe[0] == "ok", from_recipe[1]
    assert from_overrides == from_recipe
    cfg = OmegaConf.create(from_recipe[1])
    for leaf, value in zip(LEAVES, expected):
        assert OmegaConf.select(cfg, leaf.key) == value, leaf.key
    saved = tmp_path / "run" / "config.yaml"
    save_config(load_config(_recipe(tmp_path, BASE), [f"{leaf.key}={text}" for leaf, text in zip(LEAVES, texts)]),
                saved)
    assert OmegaConf.to_container(load_resolved(saved)) == from_recipe[1]


def _one_leaf_per_type() -> list[Leaf]:
    """A key of each distinct type (top level, method section and list items) plus slurm.time."""
    chosen: dict[tuple, Leaf] = {}
    for leaf in LEAVES:
        if leaf.key not in _CHOICES and leaf.key != "method.name":
            chosen.setdefault((str(leaf.kind), 0 in leaf.path, leaf.path[0] == "method"), leaf)
    return [*chosen.values(), next(leaf for leaf in LEAVES if leaf.key == "slurm.time")]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_texts_load_the_same_on_both_paths(tmp_path: Path, text: str) -> None:
    for leaf in _one_leaf_per_type():
        from_recipe, from_overrides = _both_paths(tmp_path, [leaf], [text])
        assert from_recipe[0] == from_overrides[0], (leaf.key, from_recipe, from_overrides)
        if from_recipe[0] == "error":
            assert leaf.path[-1] in from_recipe[1] and leaf.path[-1] in from_overrides[1]
            continue
        assert from_recipe == from_overrides, leaf.key
        value = OmegaConf.select(OmegaConf.create(from_recipe[1]), leaf.key)
        if _base_type(leaf.kind) is str:  # text stays text; only null is not text
            assert value == (None if text in NONE_TEXTS else text.strip('"')), leaf.key


@pytest.mark.parametrize("text, value", [("yes", True), ("no", False), ("on", True), ("1e-6", 1e-6),
                                          ("010", 10), ("[0.2, 1.0]", [0.2, 1.0])])
def test_typed_keys_convert_the_text(text: str, value: Any) -> None:
    key = {bool: "model.sync_bn", float: "optim.weight_decay", int: "train.seed", list: "optim.betas"}[type(value)]
    assert OmegaConf.select(load_config("simclr_synth", [f"{key}={text}"]), key) == value


@pytest.mark.parametrize("override, problem", [("name", "key=value"), ("name=[unclosed", "not valid YAML"),
                                               ("data.views.3.size=8", "data.views")])
def test_bad_overrides_are_one_clear_error(override: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[")):
        load_config("simclr_synth", [override])


# ----------------------------------------------------------------------------- no-effect warnings
# simclr_synth: optim.name=adamw, data.mode=finite, data.val set, train.steps unset.

@pytest.mark.parametrize("overrides, command, warned", [
    (["optim.momentum=0.5"], "train", "optim.momentum"),
    (["optim.lars_eta=0.002"], "train", "optim.lars_eta"),
    (["optim.name=lars", "optim.betas=[0.8, 0.9]"], "train", "optim.betas"),
    (["optim.name=sgd", "optim.betas.0=0.8"], "train", "optim.betas.0"),
    (["data.samples_per_epoch=1000"], "train", "data.samples_per_epoch"),
    (["data.val=null", "eval.knn_k=5"], "train", "eval.knn_k"),
    (["data.val=null", "eval.every_epochs=5"], "train", "eval.every_epochs"),
    (["data.val=null", "eval.every_epochs=0"], "launch", None),  # the documented way to turn kNN off
    (["data.val=null", "data.knn_train=elsewhere"], "train", "data.knn_train"),
    (["train.steps=5", "train.epochs=3"], "train", "train.epochs"),
    (["train.on_nonfinite=stop", "train.max_nonfinite_steps=3"], "train", "train.max_nonfinite_steps"),
    (["logging.wandb_mode=disabled", "logging.wandb_project=p"], "train", "logging.wandb_project"),
    (["slurm.nodes=2"], "train", "slurm.nodes"),
    # the same keys where they do count: no warning
    (["optim.betas=[0.8, 0.9]", "optim.base_lr=0.1", "data.image_size=24"], "train", None),
    (["optim.name=lars", "optim.momentum=0.5", "optim.lars_eta=0.002"], "train", None),
    (["data.mode=resampled", "data.samples_per_epoch=1000"], "train", None),
    (["eval.knn_k=5", "data.knn_train=elsewhere", "train.epochs=3"], "train", None),
    (["slurm.nodes=2", "slurm.time=48:00:00"], "launch", None),
])
def test_no_effect_warning_names_only_the_ineffective_key(
        monkeypatch: pytest.MonkeyPatch, overrides: list[str], command: str, warned: str | None) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    lines = ineffective_overrides(load_config("simclr_synth", overrides), overrides, command)
    assert [line.split(" ")[0] for line in lines] == ([warned] if warned else [])
    assert all(" has no effect: " in line for line in lines)


def test_launch_dry_run_keeps_the_time_and_warns_once_per_ineffective_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sslforge.cli", "launch", "simclr_synth", "slurm.time=48:00:00", "optim.momentum=0.5",
         "data.samples_per_epoch=10", "optim.base_lr=0.1", f"run_dir={tmp_path / 'run'}", "--slurm", "--dry-run"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --time=48:00:00\n" in result.stdout  # not 172800 (minutes, to SLURM)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("sslforge: warning:")]
    assert len(warnings) == 2
    assert "optim.momentum has no effect: optim.name=adamw" in warnings[0]
    assert "data.samples_per_epoch has no effect: data.mode=finite" in warnings[1]
