"""Run monitoring on rank 0: wandb (offline without credentials), metrics.jsonl, a progress bar.

Every record sent to wandb is also appended to RUN_DIR/metrics.jsonl with its `step`, so runs
can be read without wandb and tests can check what was logged. A run that restarts from a
checkpoint re-does the steps after it, so at start rank 0 drops their records (and a record
re-logged at the checkpoint's own step, such as its epoch-end kNN, replaces the earlier one):
metrics.jsonl holds one record of each kind per step, as wandb does.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text


class ImagesPerSecond(ProgressColumn):
    """Throughput as users compare it between runs and papers: images (global batch x steps)
    per second, from rich's own speed estimate over its recent updates."""

    def __init__(self, global_batch: int) -> None:
        super().__init__()
        self.global_batch = global_batch

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed * self.global_batch:,.0f} img/s" if speed else "- img/s", style="cyan")


def wandb_mode(requested: str) -> str:
    """`disabled` wins; WANDB_MODE overrides the rest; `online` without credentials falls back
    to offline rather than prompting."""
    if requested == "disabled":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        return "offline"
    return requested


def _metric_names(record: dict[str, Any]) -> frozenset[str]:
    """What a record reports: a training step and a kNN evaluation at one step are both kept."""
    return frozenset(record) - {"step", "epoch", "time"}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl; a line cut short by a crash is dropped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _rewrite(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Atomically replace metrics.jsonl with the records `keep` accepts; returns them."""
    kept = [r for r in read_records(path) if keep(r)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


class Monitor:
    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int, start_step: int,
                 wandb_id: str | None, is_main: bool) -> None:
        self.is_main = is_main
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = None
        self.progress: Progress | None = None
        self.wandb_id = wandb_id
        self.start_step = start_step
        self.logged_at_start: set[frozenset[str]] = set()  # kinds a re-logged record replaces
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():
            kept = _rewrite(self.metrics_path, lambda r: r.get("step") is None or r["step"] <= start_step)
            self.logged_at_start = {_metric_names(r) for r in kept if r.get("step") == start_step}
        mode = wandb_mode(cfg.logging.wandb_mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=cfg.name,
                dir=str(run_dir), mode=mode, id=wandb_id, resume="allow",
                config=OmegaConf.to_container(cfg, resolve=True))
            self.wandb_id = self.run.id
        if cfg.logging.progress:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     ImagesPerSecond(cfg.optim.batch_size), TextColumn("{task.fields[status]}"),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task(cfg.name, total=total_steps, completed=start_step, status="")
            self.progress.start()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold `step`) to metrics.jsonl and wandb."""
        if not self.is_main:
            return
        record = {**record, "time": time.time()}
        names = _metric_names(record)
        if record["step"] == self.start_step and names in self.logged_at_start:
            self.logged_at_start.discard(names)
            _rewrite(self.metrics_path, lambda r: r.get("step") != self.start_step or _metric_names(r) != names)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, name: str, path: Path, step: int) -> None:
        """An image file the run wrote (a sample grid) into wandb; the file itself is the record."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))}, step=step)

    def advance(self, step: int, status: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.run is not None:
            self.run.finish()
