"""`sslforge eval knn`: load a run's encoder from its checkpoint and report kNN top-1."""
from __future__ import annotations

import json
import time
from pathlib import Path


from sslforge.config import load_resolved
from sslforge.eval.features import extract_features
from sslforge.eval.knn import weighted_knn
from sslforge.launcher.env import init_distributed
from sslforge.methods import build_method
from sslforge.trainer.checkpoint import load_module_weights
from sslforge.trainer.loop import seed_everything


def _run_dir_of(source: Path) -> Path:
    for candidate in (source, source.parent, source.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no run directory (with config.yaml) at or above {source}")


def evaluate_knn(source: Path, train: str, val: str, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 256, workers: int = 2, random_init: bool = False) -> float:
    """Top-1 (%) of the encoder in `source` (a run dir or checkpoint); appended to metrics.jsonl."""
    run_dir = _run_dir_of(source)
    cfg = load_resolved(run_dir / "config.yaml")
    env = init_distributed("auto")
    seed_everything(cfg.train.seed)
    method = build_method(cfg)
    step = 0
    if not random_init:
        weights, ckpt = load_module_weights(source)  # data only: a checkpoint cannot run code
        method.load_state_dict(weights)
        step = int(ckpt.name.removeprefix("step_"))
    encoder = method.encoder().to(env.device)
    bank = extract_features(encoder, train, cfg.data.image_size, batch_size, env, workers)
    queries = extract_features(encoder, val, cfg.data.image_size, batch_size, env, workers)
    top1 = weighted_knn(bank.features, bank.labels, queries.features, queries.labels, k, temperature)
    record = {"step": step, "eval": "knn", "knn_top1": top1, "k": k, "temperature": temperature,
              "random_init": random_init, "train": train, "val": val, "time": time.time()}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return top1


__all__ = ["evaluate_knn"]
