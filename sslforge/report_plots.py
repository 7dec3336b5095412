"""The drawing half of `sslforge report`: lines over steps and an embedding scatter, as
matplotlib `Figure` objects built without pyplot (no global figure registry to close, no
display: Figure.savefig renders through Agg), so the report can be made anywhere, a cluster
login node included. What is drawn is prepared in `sslforge.report`; a test can read a figure's
lines back and compare them with the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

RUN_COLOURS = "tab10"  # one colour per run, the same in every figure
LEGEND_MAX_CLASSES = 20  # beyond this a legend of classes hides the plot


@dataclass
class Line:
    """One curve: a metric of one run, one value per step."""

    label: str
    steps: list[int]
    values: list[float]
    run_index: int  # picks the colour: a run keeps its colour across figures
    style: str = "-"
    marker: str | None = None  # sparse series (evaluations) mark their points


@dataclass
class Baseline:
    """A horizontal reference (the kNN top-1 of the encoder at random init)."""

    label: str
    value: float
    run_index: int


@dataclass
class Embedding:
    """2-d projections of val embeddings with their labels (-1: unlabelled)."""

    points: np.ndarray  # (n, 2)
    labels: np.ndarray  # (n,) int
    class_names: list[str] | None  # index -> name, from the shards' classes.json
    method: str  # "t-SNE" | "UMAP"
    step: int  # the checkpoint the embeddings come from


def run_colour(index: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    cmap = colormaps[RUN_COLOURS]
    return cmap(index % cmap.N)


def line_figure(lines: Sequence[Line], title: str, ylabel: str, baselines: Sequence[Baseline] = ()) -> Figure:
    """Every line over steps, one legend entry each; a line of one point gets a marker so it shows."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for line in lines:
        ax.plot(line.steps, line.values, line.style, label=line.label, color=run_colour(line.run_index),
                marker=line.marker or ("o" if len(line.steps) == 1 else None))
    for base in baselines:
        ax.axhline(base.value, linestyle=":", color=run_colour(base.run_index), label=base.label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def class_colours(count: int) -> np.ndarray:
    """`count` distinct RGBA colours: tab10 / tab20 up to 20 classes, evenly spaced on turbo beyond."""
    from matplotlib import colormaps

    if count <= 20:
        cmap = colormaps["tab10" if count <= 10 else "tab20"]
        return np.asarray([cmap(i) for i in range(count)])
    return colormaps["turbo"](np.linspace(0.0, 1.0, count))


def embedding_figure(embedding: Embedding, title: str) -> Figure:
    """One scatter (one colour, one legend entry) per label present; the legend is left out
    past `LEGEND_MAX_CLASSES` classes."""
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    present = np.unique(embedding.labels)
    for colour, label in zip(class_colours(len(present)), present):
        at = embedding.labels == label
        ax.scatter(embedding.points[at, 0], embedding.points[at, 1], s=6, color=colour,
                   label=_class_name(int(label), embedding.class_names))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(present) <= LEGEND_MAX_CLASSES:
        ax.legend(fontsize="small", markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _class_name(label: int, names: list[str] | None) -> str:
    if label < 0:
        return "unlabelled"
    return names[label] if names and label < len(names) else str(label)


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
