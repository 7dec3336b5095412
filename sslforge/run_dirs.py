"""Where a run lives when the command line does not say: never in another experiment's directory.

`resume=auto` continues whatever run its directory holds, so the default directory must hold
this experiment's run or none. When `run_dir` is not given, the run goes to `runs/NAME`, or
`runs/NAME-DATA` when `data.train` is given on the command line (DATA: the shards' folder,
generic names like `train` or `shards` skipped: `/data/in1k/train` -> `in1k`), and to the first
of that, `-2`, `-3`, ... that is free or holds a run this config may resume (`resume_guard`:
the same NEVER keys and training shards, CONSENT keys the same or in `allow_changes`). A
directory passed over is named in one line with its differences. A `run_dir` given explicitly
is used as given, and `resume_guard.check_resume` refuses a changed config there.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from sslforge.config import Config, dotted_key, parse_overrides
from sslforge.resume_guard import checkpoint_tag, differences

DEFAULT_RUN_DIR = next(f.default for f in dataclasses.fields(Config) if f.name == "run_dir")  # runs/${name}
# Folder names that say nothing about which data it is.
GENERIC = frozenset({"train", "training", "val", "valid", "validation", "test", "shards", "shard", "tars", "tar",
                     "wds", "webdataset", "data", "dataset", "datasets", "images", "imgs"})


def run_dir_given(cfg: DictConfig) -> bool:
    """Whether `run_dir` was set by a recipe or the command line, not left at the schema's default."""
    return OmegaConf.to_container(cfg, resolve=False)["run_dir"] != DEFAULT_RUN_DIR  # type: ignore[index]


def data_label(spec: str) -> str:
    """A short name for the training data: the last folder of the (first) shard spec whose name
    is not generic, made safe for a directory name; '' when there is none."""
    first = Path(spec.split("::")[0].strip())
    if first.suffix == ".tar" or "{" in first.name:
        first = first.parent  # a shard file or brace pattern: its folder names the data
    for part in reversed(first.parts):
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-.")
        if label and label.lower() not in GENERIC:
            return label
    return ""


def default_base(cfg: DictConfig, overrides: Sequence[str]) -> Path:
    """`runs/NAME`, or `runs/NAME-DATA` for data given on the command line (NAME not given there too)."""
    base = Path(cfg.run_dir)
    given = {dotted_key(key) for key, _ in parse_overrides(overrides)}
    label = data_label(cfg.data.train) if given & {"data", "data.train"} and "name" not in given else ""
    if label and label not in cfg.name.split("-"):
        return base.with_name(f"{base.name}-{label}")
    return base


def _why_not(run_dir: Path, cfg: DictConfig) -> str | None:
    """Why `cfg` may not go on in `run_dir`, starting with the directory's name; None when it
    may (the directory is free, or holds a run this config resumes)."""
    tag = checkpoint_tag(run_dir)
    held = f"{run_dir} ({tag})" if tag else str(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return f"{held}: it holds checkpoints but no config.yaml to compare with" if tag else None
    if cfg.resume == "none" and tag:
        return f"{held}: resume=none starts from scratch, and it holds checkpoints"
    found = differences(run_dir, cfg)
    if not found:
        return None
    consent = f" ({found.allow_changes()} resumes it instead)" if found.consent and not found.never else ""
    return f"{held}, whose config differs: {found.keys()}{consent}"


def place_run(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Set `cfg.run_dir` when it was not given (see the module's docstring); says so in one line
    when the default directory holds another run. Reads only."""
    if run_dir_given(cfg):
        return
    base = default_base(cfg, overrides)
    passed_over = None
    candidate, n = base, 1
    while (why := _why_not(candidate, cfg)) is not None:
        passed_over = passed_over or why
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    cfg.run_dir = str(candidate)
    if passed_over:
        from sslforge.launcher.env import launched_rank, under_external_launcher

        if not under_external_launcher() or launched_rank() == 0:
            new = "" if (candidate / "config.yaml").is_file() else "new "
            print(f"sslforge: {new}run dir {candidate}; not resuming {passed_over}", file=sys.stderr)


__all__ = ["DEFAULT_RUN_DIR", "data_label", "default_base", "place_run", "run_dir_given"]
