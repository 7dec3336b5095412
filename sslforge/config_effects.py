"""Overrides that cannot change a run: one warning line each, from the launching process.

A mistyped intent (`optim.momentum` for AdamW, `data.samples_per_epoch` in finite mode) would
otherwise be silently ignored; the rules live in one table of (keys, condition, reason).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from omegaconf import DictConfig

from sslforge.config import dotted_key, parse_overrides


@dataclass(frozen=True)
class _NoEffect:
    """Overriding `keys` (or any key under them) cannot change the run `when` this holds;
    `reason` is formatted with the config as `cfg`."""

    keys: tuple[str, ...]
    when: Callable[[DictConfig, str], bool]
    reason: str


_NO_EFFECT = (
    _NoEffect(("data.samples_per_epoch",), lambda c, _: c.data.mode == "finite",
              "data.mode=finite reads every sample once per epoch; it applies with data.mode=resampled"),
    _NoEffect(("optim.momentum",), lambda c, _: c.optim.name == "adamw",
              "optim.name=adamw has no momentum term (it uses optim.betas)"),
    _NoEffect(("optim.lars_eta",), lambda c, _: c.optim.name != "lars",
              "only optim.name=lars has a trust coefficient (optim.name={cfg.optim.name})"),
    _NoEffect(("optim.betas",), lambda c, _: c.optim.name != "adamw",
              "only optim.name=adamw uses betas (optim.name={cfg.optim.name})"),
    _NoEffect(("data.knn_train", "eval.knn_k", "eval.knn_temperature", "eval.batch_size"),
              lambda c, _: not c.data.val, "kNN evaluation needs data.val, which is not set"),
    # eval.every_epochs=0 beside data.val=null is how the probe is turned off: no warning
    _NoEffect(("eval.every_epochs",), lambda c, _: not c.data.val and c.eval.every_epochs != 0,
              "kNN evaluation needs data.val, which is not set"),
    _NoEffect(("eval.at_end",), lambda c, _: not c.data.val and bool(c.eval.at_end),
              "kNN evaluation needs data.val, which is not set"),
    _NoEffect(("train.epochs",), lambda c, _: c.train.steps is not None,
              "train.steps={cfg.train.steps} sets the run's length"),
    _NoEffect(("train.max_nonfinite_steps",), lambda c, _: c.train.on_nonfinite == "stop",
              "train.on_nonfinite=stop stops at the first non-finite loss"),
    _NoEffect(("logging.wandb_project", "logging.wandb_entity"),
              lambda c, _: c.logging.wandb_mode == "disabled", "logging.wandb_mode=disabled"),
    _NoEffect(("logging.wandb_mode",),
              lambda c, _: bool(os.environ.get("WANDB_MODE")) and c.logging.wandb_mode != "disabled",
              "the WANDB_MODE environment variable sets the mode"),
    _NoEffect(("slurm",), lambda _, command: command != "launch",
              "slurm.* keys are read only by `sslforge launch --slurm`"),
)


def ineffective_overrides(cfg: DictConfig, overrides: Sequence[str], command: str) -> list[str]:
    """One line per override that cannot change this run (`command`: train | launch), naming
    the key and why, so a mistyped intent is not silently ignored."""
    lines = []
    for key, _ in parse_overrides(overrides):
        key = dotted_key(key)
        for rule in _NO_EFFECT:
            if any(key == k or key.startswith(k + ".") for k in rule.keys) and rule.when(cfg, command):
                lines.append(f"{key} has no effect: {rule.reason.format(cfg=cfg)}")
                break
    return lines
