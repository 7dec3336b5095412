"""Resuming with a changed config: refused before anything is written, unless consented to.

A checkpoint means something only with the config that wrote it: its tensors have the model's
shapes, its optimiser state the optimiser's layout, its data position counts global batches of
one dataset. Before `sslforge train` or `launch` writes anything, the new config is compared with
the saved `config.yaml` of the run it would resume, key by key, and every key is in one class:

- NEVER: a change makes the checkpoint mean something else (tensors, optimiser state or data
  position misread): refused. Keep the saved value, or start a new run directory.
- CONSENT: the checkpoint is read correctly, but the run goes on along another course (more
  epochs, another learning rate): allowed only when named in `allow_changes=[KEY,...]`.
- FREE: where and how the run is stored, watched and evaluated: not compared. Note that
  `data.num_workers`, `data.shuffle_buffer` and the number of ranks re-plan the rest of the
  current epoch (and, for finite data, may change its length by the padding): the resumed run
  is then no longer bit-identical to an uninterrupted one.

A key or section is looked up by its longest listed prefix (`method` covers every method key).
The training data is compared by its shards (`shard_fingerprint`: their names and sizes, saved
beside the config as `SHARDS_FILE`), not by the path alone: shards rewritten in place are other
data, and a copy elsewhere is the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sslforge.config import ConfigError, load_resolved, save_config

SHARDS_FILE = "train_shards.json"  # the fingerprint of the run's training shards, beside config.yaml

NEVER = frozenset({
    "method",  # the method's networks, loss and state
    "model.backbone", "model.small_stem", "model.proj_hidden_dim", "model.proj_output_dim",  # shapes
    "model.patch_size", "model.num_heads", "model.depth", "model.vit_init",
    "model.vit_frozen_patch_embed", "model.vit_sincos_pos_embed",  # which parameters train
    "optim.name", "optim.exclude_bias_and_norm", "engine.zero_stage",  # optimiser state layout
    "optim.batch_size",  # the data position and the schedule count global batches
    "data.train", "data.mode", "data.samples_per_epoch", "train.seed",  # what the position points into
    "data.image_size", "data.views",  # the inputs the weights were trained on
    "data.tokenizer", "data.max_tokens",  # the token ids the text weights were trained on
})
CONSENT = frozenset({
    "train.epochs", "train.steps",
    "optim.base_lr", "optim.lr_scaling", "optim.lr_schedule", "optim.min_lr", "optim.warmup_epochs",
    "optim.warmup_start_lr", "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.momentum", "optim.betas", "optim.lars_eta",
    "engine.precision", "engine.grad_clip", "engine.grad_clip_mode",
    "model.drop_path",
    "model.sync_bn",  # same tensors; statistics over the global or the local batch from now on
})
FREE = frozenset({
    "name", "run_dir", "resume", "allow_changes",
    "data.val", "data.knn_train", "data.num_workers", "data.shuffle_buffer",
    "engine.backend", "engine.collective_timeout_min", "engine.peer_timeout_s",
    "train.log_every_steps", "train.ckpt_every_steps", "train.keep_last", "train.on_nonfinite",
    "train.max_nonfinite_steps",
    "eval", "logging", "slurm",
})
CLASSES = {"never": NEVER, "consent": CONSENT, "free": FREE}


class ResumeConflict(ConfigError):
    """The config would resume a run whose checkpoints it would misread or silently re-steer."""


def key_class(key: str) -> str:
    """'never', 'consent' or 'free' for a dotted key; an unlisted key is 'never' (the safe side).
    A part's optimiser key (`optim.parts.<part>.<key>`) is classed as `optim.<key>`, its update
    ratio (`every`) as a change of course."""
    parts = key.split(".")
    if parts[:2] == ["optim", "parts"] and len(parts) == 4:
        if parts[3] == "every":
            return "consent"
        parts = ["optim", parts[3]]
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for name, keys in CLASSES.items():
            if prefix in keys:
                return name
    return "never"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of a resolved config; lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, new) for every key both configs hold with different values, in key order.
    A key only one side has is left out: the schema grew or shrank between versions."""
    a, b = flatten(saved), flatten(new)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def checkpoint_tag(run_dir: Path) -> str | None:
    """The checkpoint `resume=auto` would start from in `run_dir` (its tag), or None."""
    from sslforge.trainer.checkpoint import find_checkpoints

    found = find_checkpoints(run_dir / "checkpoints")
    if found.tags:
        return found.tags[0]
    return "latest" if found.has_pointer else None


def resumed_run(cfg: DictConfig) -> tuple[Path, str] | None:
    """(run directory whose checkpoint this config would load, checkpoint), or None for a
    fresh start or when that run has no saved config to compare with. `resume=none` over
    existing checkpoints is refused: its checkpoints would mix with theirs under one `latest`,
    and `keep_last` would prune theirs."""
    run_dir = Path(cfg.run_dir)
    if cfg.resume in ("auto", "none"):
        tag = checkpoint_tag(run_dir)
        if tag and cfg.resume == "none":
            raise ResumeConflict(f"run_dir {run_dir} already holds checkpoints ({tag}); resume=none would "
                                 "train from scratch over them: use a new run_dir, or resume=auto to continue "
                                 f"this run, or move {run_dir / 'checkpoints'} away first")
        return _with_config(run_dir, tag, cfg.resume) if tag else None
    source = Path(cfg.resume)
    if not source.exists():
        raise ResumeConflict(f"resume={cfg.resume}: no such checkpoint or run directory")
    holder = next((p for p in (source, source.parent, source.parent.parent) if (p / "config.yaml").is_file()),
                  source)
    return _with_config(holder, source.name if source.name.startswith("step_") else "its latest checkpoint",
                        cfg.resume)


def _with_config(run_dir: Path, tag: str, resume: str) -> tuple[Path, str] | None:
    if (run_dir / "config.yaml").is_file():
        return run_dir, tag
    print(f"sslforge: warning: resume={resume}: no config.yaml in {run_dir}, so the config cannot be "
          "compared with the one that wrote the checkpoint", file=sys.stderr)
    return None


def _check_allowed(cfg: DictConfig, keys: dict[str, Any]) -> set[str]:
    allowed = set(cfg.allow_changes)
    for key in sorted(allowed):
        if key not in keys:
            raise ConfigError(f"invalid value for 'allow_changes': '{key}' is not a config key")
        if key_class(key) == "never":
            raise ConfigError(f"invalid value for 'allow_changes': '{key}' can never change on resume "
                              "(it changes what the checkpoint means); start a new run_dir instead")
    return allowed


def _show(value: Any) -> str:
    """A value for a one-line message: text whole (a path must be recognisable), others (view
    lists) cut at 40 characters."""
    text = "null" if value is None else str(value)
    return text if isinstance(value, str) or len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------ the training data itself


def shard_fingerprint(spec: str) -> dict[str, Any] | None:
    """Number, total bytes and a digest of the names and sizes of the shards `spec` names, or
    None when they cannot be listed here. The same path can name other data (shards rewritten
    in place), and other paths the same data (a copy, `./A` for `A`): the shards decide."""
    from sslforge.data_pipeline import DataError
    from sslforge.data_pipeline.shards import expand_shards

    try:
        paths = expand_shards(spec)
        sizes = [os.path.getsize(p) for p in paths]
    except (DataError, OSError):
        return None
    digest = hashlib.sha256("".join(f"{os.path.basename(p)}\t{n}\n" for p, n in zip(paths, sizes)).encode())
    return {"shards": len(paths), "bytes": sum(sizes), "digest": digest.hexdigest()[:16]}


def _saved_shards(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SHARDS_FILE).read_text())
    except (OSError, ValueError):
        return None  # a run from before the fingerprint, or no run: the path alone is compared


def _shards_text(fp: dict[str, Any]) -> str:
    return f"{fp['shards']} shard(s), {fp['bytes']:,} bytes"


def save_run(cfg: DictConfig) -> Path:
    """Write the run's `config.yaml` and the fingerprint of its training shards (`SHARDS_FILE`),
    which a later resume is compared with; returns the config's path."""
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir / "config.yaml")
    fingerprint = shard_fingerprint(cfg.data.train)
    if fingerprint is None:  # not listable here: a stale fingerprint must not speak for this data
        (run_dir / SHARDS_FILE).unlink(missing_ok=True)
    else:
        tmp = run_dir / f".{SHARDS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"data.train": cfg.data.train, **fingerprint}, indent=1) + "\n")
        tmp.replace(run_dir / SHARDS_FILE)
    return run_dir / "config.yaml"


# ------------------------------------------------------------------ comparing


@dataclass(frozen=True)
class Differences:
    """What stands between a config and resuming a saved run: changes never allowed, and
    changes of course not named in `allow_changes` (key, text)."""
    never: list[str]
    consent: list[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.never or self.consent)

    def keys(self) -> str:
        """The differences in short, for one line: `data.train A -> B, train.epochs 4 -> 8`."""
        return ", ".join([*self.never, *(text for _, text in self.consent)])

    def describe(self) -> str:
        parts = []
        if self.never:
            parts.append(f"{', '.join(self.never)} would change what the checkpoint means (never allowed)")
        if self.consent:
            parts.append(f"{', '.join(text for _, text in self.consent)} would change the run's course "
                         f"(allowed with {self.allow_changes()})")
        return "; ".join(parts)

    def allow_changes(self) -> str:
        return f"allow_changes=[{','.join(k for k, _ in self.consent)}]"


def differences(run_dir: Path, cfg: DictConfig) -> Differences:
    """How `cfg` differs from the config saved in `run_dir` in the keys a resume compares; the
    training data by its shards when both sides can list them, else by `data.train`."""
    new = OmegaConf.to_container(cfg, resolve=True)
    allowed = _check_allowed(cfg, flatten(new))
    saved = OmegaConf.to_container(load_resolved(run_dir / "config.yaml"), resolve=True)
    changes = [(k, a, b, key_class(k)) for k, a, b in changed_keys(saved, new)]  # type: ignore[arg-type]
    never: list[str] = []
    before, now = _saved_shards(run_dir), shard_fingerprint(cfg.data.train)
    if before is not None and now is not None:
        changes = [c for c in changes if c[0] != "data.train"]
        if before.get("digest") != now["digest"]:
            path = _show(cfg.data.train)
            if before.get("data.train") != cfg.data.train:
                path = f"{_show(before.get('data.train'))} -> {path}"
            never.append(f"data.train {path} (other shards: {_shards_text(before)} -> {_shards_text(now)})")
    never += [f"{k} {_show(a)} -> {_show(b)}" for k, a, b, c in changes if c == "never"]
    consent = [(k, f"{k} {_show(a)} -> {_show(b)}") for k, a, b, c in changes if c == "consent" and k not in allowed]
    return Differences(never, consent)


def check_resume(cfg: DictConfig) -> None:
    """Raise ResumeConflict (one line naming every offending key as saved -> new, and the ways
    out) when `cfg` would resume a run with a NEVER key changed, or a CONSENT key not in
    `allow_changes`; and when a local `sslforge train` is still training that run directory.
    Reads only: call it before writing anything."""
    from sslforge.launcher.local_jobs import refuse_if_running

    _check_allowed(cfg, flatten(OmegaConf.to_container(cfg, resolve=True)))
    refuse_if_running(Path(cfg.run_dir))
    resumed = resumed_run(cfg)
    if resumed is None:
        return
    run_dir, tag = resumed
    found = differences(run_dir, cfg)
    if not found:
        return
    if cfg.resume == "auto":
        anew = ("to start anew, give another run_dir (or leave run_dir out: a run whose config differs "
                "from the saved one then gets a directory of its own)")
    else:
        anew = f"to start anew, leave out resume={cfg.resume}"
    raise ResumeConflict(f"cannot resume {run_dir} ({tag}) with a changed config: {found.describe()}; "
                         f"to resume it, keep the values saved in {run_dir / 'config.yaml'}; {anew}")


__all__ = ["CLASSES", "SHARDS_FILE", "Differences", "ResumeConflict", "changed_keys", "check_resume", "checkpoint_tag",
           "differences", "flatten", "key_class", "resumed_run", "save_run", "shard_fingerprint"]
