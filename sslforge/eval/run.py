"""`sslforge eval ...` on a run: load its method from the config and a checkpoint, score it,
and append the result to the run's metrics.jsonl (`eval knn` here; `eval robustness` and
`eval token-labels` load through `load_method` too)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sslforge.config import load_resolved
from sslforge.eval.features import extract_features
from sslforge.eval.knn import weighted_knn
from sslforge.launcher.env import init_distributed
from sslforge.methods import build_method
from sslforge.methods.base import Method
from sslforge.trainer.checkpoint import load_module_weights
from sslforge.trainer.loop import seed_everything


def run_dir_of(source: Path) -> Path:
    """`source` or the run directory (with config.yaml) above it, a checkpoint directory at most two levels down."""
    for candidate in (source, source.parent, source.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no run directory (with config.yaml) at or above {source}")


def load_method(source: Path, random_init: bool = False) -> tuple[Path, DictConfig, Method, int]:
    """The run directory at or above `source` (a run or checkpoint directory), its resolved
    config, its method holding the weights of the best loadable checkpoint at `source` (read as
    data only: a checkpoint cannot run code) and that checkpoint's step; with `random_init`, the
    method as the run's seed builds it (the global generators reseeded), step 0. On CPU: the
    caller moves what it scores."""
    run_dir = run_dir_of(source)
    cfg = load_resolved(run_dir / "config.yaml")
    if random_init:
        seed_everything(cfg.train.seed)
    method = build_method(cfg)
    step = 0
    if not random_init:
        weights, ckpt = load_module_weights(source)
        method.load_state_dict(weights)
        step = int(ckpt.name.removeprefix("step_"))
    return run_dir, cfg, method, step


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One evaluation record (with its `step` and `eval` kind) appended to metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**record, "time": time.time()}) + "\n")


def evaluate_knn(source: Path, train: str, val: str, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 256, workers: int = 2, random_init: bool = False) -> float:
    """Top-1 (%) of the encoder in `source` (a run dir or checkpoint); appended to metrics.jsonl."""
    env = init_distributed("auto")
    run_dir, cfg, method, step = load_method(source, random_init)
    encoder = method.encoder().to(env.device)
    bank = extract_features(encoder, train, cfg.data.image_size, batch_size, env, workers)
    queries = extract_features(encoder, val, cfg.data.image_size, batch_size, env, workers)
    top1 = weighted_knn(bank.features, bank.labels, queries.features, queries.labels, k, temperature)
    if env.is_main:  # under torchrun every rank computes the same top-1; one record
        append_metrics(run_dir, {"step": step, "eval": "knn", "knn_top1": top1, "k": k, "temperature": temperature,
                                 "random_init": random_init, "train": train, "val": val})
    return top1


__all__ = ["append_metrics", "evaluate_knn", "load_method"]
