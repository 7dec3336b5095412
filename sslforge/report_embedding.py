"""The embedding half of `sslforge report`: a run's val embeddings (its latest loadable
checkpoint's encoder, one process), a fixed subsample of them, projected to 2-d by t-SNE
(scikit-learn) or UMAP (umap-learn, when installed) with a fixed random_state, drawn coloured by
label."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sslforge.eval import EvalError
from sslforge.report_plots import Embedding, embedding_figure, save

if TYPE_CHECKING:
    from sslforge.report import RunMetrics

EMBEDDINGS = {"tsne": "t-SNE", "umap": "UMAP"}
SEED = 0  # the subsample and the projection are the same on every report of a run


def check_embedding(kind: str) -> None:
    """Fail before any work when the projection asked for cannot be made."""
    if kind not in (*EMBEDDINGS, "none"):
        raise EvalError(f"--embedding must be one of tsne, umap, none; got {kind!r}")
    if kind == "umap":
        try:
            import umap  # noqa: F401
        except ImportError:
            raise EvalError("--embedding umap needs the umap-learn package (import umap), which is not "
                            "installed: pip install umap-learn, or use --embedding tsne") from None


def subsample(count: int, samples: int) -> np.ndarray:
    """Sorted indices of `samples` of `count` items, the same on every call."""
    if count <= samples:
        return np.arange(count)
    return np.sort(np.random.default_rng(SEED).choice(count, size=samples, replace=False))


def project(features: np.ndarray, kind: str) -> np.ndarray:
    """(n, d) features to (n, 2), deterministically (fixed random_state)."""
    if kind == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=SEED).fit_transform(features)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(features) - 1) / 3)  # t-SNE needs perplexity < samples
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=SEED).fit_transform(features)


def run_embedding(run: RunMetrics, kind: str, samples: int, val: str | None, batch_size: int,
                  workers: int) -> Embedding | str:
    """The projection of up to `samples` val embeddings of the run's latest loadable checkpoint,
    or why there is none."""
    from sslforge.data_pipeline.shards import expand_shards
    from sslforge.eval.features import extract_features
    from sslforge.eval.run import load_method
    from sslforge.eval.token_labels import class_names
    from sslforge.launcher.env import init_distributed
    from sslforge.trainer.checkpoint import CheckpointError, find_checkpoints

    shards = val or run.cfg.data.get("val")
    if not shards:
        return "no val shards (pass --val or set data.val)"
    if not find_checkpoints(run.run_dir).tags:
        return "no checkpoint yet"
    env = init_distributed("auto")  # one process: the features of every val sample
    try:
        _, cfg, method, step = load_method(run.run_dir)
    except CheckpointError as exc:
        return str(exc)
    found = extract_features(method.encoder().to(env.device), shards, cfg.data.image_size, batch_size, env, workers)
    keep = subsample(len(found.labels), samples)
    if len(keep) < 5:
        return f"only {len(keep)} readable val samples in {shards}: too few to project"
    points = project(found.features[keep].numpy(), kind)
    return Embedding(points, found.labels[keep].numpy(), class_names(expand_shards(shards)), EMBEDDINGS[kind], step)


def file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def write_embeddings(runs: list[RunMetrics], out: Path, kind: str, samples: int, val: str | None,
                     batch_size: int, workers: int) -> dict[str, Path | str]:
    """Per run label: its embedding PNG, or the note saying why it has none."""
    written: dict[str, Path | str] = {}
    for run in runs:
        if kind == "none":
            written[run.label] = "not asked for (--embedding none)"
            continue
        embedding = run_embedding(run, kind, samples, val, batch_size, workers)
        if isinstance(embedding, str):
            print(f"sslforge report: {run.label}: no embedding plot: {embedding}")
            written[run.label] = embedding
            continue
        title = f"{run.label}: {embedding.method} of {len(embedding.labels)} val embeddings, step {embedding.step}"
        written[run.label] = save(embedding_figure(embedding, title), out / f"embedding_{file_stem(run.label)}.png")
    return written
