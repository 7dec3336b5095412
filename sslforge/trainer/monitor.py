"""Run monitoring on rank 0: wandb (offline without credentials), metrics.jsonl, a progress bar.

Every record sent to wandb is also appended to RUN_DIR/metrics.jsonl with its `step`, so runs
can be read without wandb and tests can check what was logged.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _wandb_mode(requested: str) -> str:
    """`disabled` wins; WANDB_MODE overrides the rest; `online` without credentials falls back
    to offline rather than prompting."""
    if requested == "disabled":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        return "offline"
    return requested


class Monitor:
    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int, start_step: int,
                 wandb_id: str | None, is_main: bool) -> None:
        self.is_main = is_main
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = None
        self.progress: Progress | None = None
        self.wandb_id = wandb_id
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = _wandb_mode(cfg.logging.wandb_mode)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, name=cfg.name,
                dir=str(run_dir), mode=mode, id=wandb_id, resume="allow",
                config=OmegaConf.to_container(cfg, resolve=True))
            self.wandb_id = self.run.id
        if cfg.logging.progress:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn())
            self.task = self.progress.add_task(cfg.name, total=total_steps, completed=start_step, status="")
            self.progress.start()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold `step`) to metrics.jsonl and wandb."""
        if not self.is_main:
            return
        record = {**record, "time": time.time()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def advance(self, step: int, status: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.run is not None:
            self.run.finish()
