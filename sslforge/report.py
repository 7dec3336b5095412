"""`sslforge report RUN [RUN ...]`: what runs did, as PNG figures and a markdown summary.

Each run's metrics.jsonl is read as wandb shows it: a line cut short by a crash is dropped, and
a step logged more than once (a run that crashed and resumed from an earlier checkpoint re-does
its steps) keeps the last value of each metric. One PNG per quantity overlays the runs (loss and
part losses, lr, samples/s, data wait, embedding std, top-1 by kind over steps); a kNN top-1 of
the encoder at random init (`eval knn --random-init`) is a dotted baseline, never the run's
top-1. Each run with a checkpoint and val shards also gets a t-SNE (or UMAP) of its val
embeddings coloured by label. report.md tabulates the runs and links the figures, which are
logged to wandb when it is on: to the run's own wandb run (resumed by its id) for one run, to
a new `report` run for several. Everything is written under `out`, never into the runs.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sslforge.report_embedding import check_embedding, write_embeddings
from sslforge.report_plots import Baseline, Line, line_figure, save
from sslforge.trainer.monitor import read_records, wandb_mode

TOP1 = {"knn_top1": "kNN", "val_top1": "classifier", "linear_top1": "linear probe"}
NOT_METRICS = ("step", "time")
Series = tuple[list[int], list[float]]  # steps ascending, one value per step


@dataclass
class Quantity:
    """A figure: the metrics it overlays (`name` itself, plus parts for loss and lr)."""

    name: str
    ylabel: str
    with_parts: bool = False

    def matches(self, key: str) -> bool:
        return key == self.name or (self.with_parts and key.startswith(f"{self.name}_"))


QUANTITIES = (Quantity("loss", "loss", with_parts=True), Quantity("lr", "learning rate", with_parts=True),
              Quantity("samples_per_s", "samples / s"), Quantity("data_wait_frac", "data wait (fraction of time)"),
              Quantity("embedding_std", "embedding std (0: collapsed)"))


@dataclass
class RunMetrics:
    run_dir: Path
    label: str  # the legend's name: config `name`, made unique among the runs reported
    cfg: DictConfig
    series: dict[str, Series]
    baselines: dict[str, float] = field(default_factory=dict)  # top-1 metric -> value at random init


@dataclass
class RunSummary:
    label: str
    method: str
    backbone: str
    steps_done: int | None  # the last training step logged
    planned: str  # "200" steps, or "100 epochs"
    final_loss: float | None
    top1: dict[str, tuple[float, int, float, int]]  # kind -> (best, its step, last, its step)
    samples_per_s: float | None  # median over the log lines
    data_wait_frac: float | None  # median


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(records: list[dict[str, Any]]) -> tuple[dict[str, Series], dict[str, float]]:
    """Per metric, its steps and values (the last record of a step wins); and the top-1 of
    random-init evaluations, kept apart as baselines."""
    by_metric: dict[str, dict[int, float]] = {}
    baselines: dict[str, float] = {}
    for record in records:
        step = record.get("step")
        if record.get("random_init") is True:
            baselines.update({k: float(v) for k, v in record.items() if k in TOP1 and _is_number(v)})
        elif _is_number(step):
            for key, value in record.items():
                if key not in NOT_METRICS and _is_number(value):
                    by_metric.setdefault(key, {})[int(step)] = float(value)
    series = {key: (sorted(values), [values[s] for s in sorted(values)]) for key, values in by_metric.items()}
    return series, baselines


def read_run(run_dir: Path) -> RunMetrics:
    """A run's metrics; a directory without metrics.jsonl or config.yaml is named in the error."""
    for name in ("metrics.jsonl", "config.yaml"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} has no {name}: not a run directory, or it has not logged yet")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    series, baselines = metric_series(read_records(run_dir / "metrics.jsonl"))
    return RunMetrics(run_dir, str(cfg.get("name") or run_dir.name), cfg, series, baselines)


def _disambiguated(labels: list[str], extra: list[str]) -> list[str]:
    """The labels, each one that several share followed by its `extra`."""
    return [f"{label} ({more})" if labels.count(label) > 1 else label for label, more in zip(labels, extra)]


def read_runs(run_dirs: list[Path]) -> list[RunMetrics]:
    """Every run, labelled by its config name; runs sharing a name get their directory's name
    added, then their position."""
    runs = [read_run(d) for d in run_dirs]
    labels = _disambiguated([r.label for r in runs], [r.run_dir.name for r in runs])
    for run, label in zip(runs, _disambiguated(labels, [f"#{i + 1}" for i in range(len(runs))])):
        run.label = label
    return runs


# ------------------------------------------------------------------ what each figure shows
def quantity_lines(runs: list[RunMetrics], quantity: Quantity) -> list[Line]:
    """The quantity's metric (and its parts) of each run; the run's name labels its own metric."""
    lines = []
    for index, run in enumerate(runs):
        keys = sorted(k for k in run.series if quantity.matches(k))
        for n, key in enumerate(keys):
            steps, values = run.series[key]
            label = run.label if key == quantity.name else f"{run.label} {key}"
            lines.append(Line(label, steps, values, index, "-" if key == quantity.name else ("--", "-.", ":")[n % 3]))
    return lines


def top1_lines(runs: list[RunMetrics]) -> tuple[list[Line], list[Baseline]]:
    """Top-1 of each kind over steps per run, and each run's random-init kNN as a baseline."""
    lines, baselines = [], []
    for index, run in enumerate(runs):
        for n, (key, kind) in enumerate(TOP1.items()):
            if key in run.series:
                lines.append(Line(f"{run.label} {kind}", *run.series[key], index, ("-", "--", "-.")[n], "os^"[n]))
            if key in run.baselines:
                baselines.append(Baseline(f"{run.label} {kind} at random init", run.baselines[key], index))
    return lines, baselines


def write_metric_figures(runs: list[RunMetrics], out: Path) -> list[Path]:
    """One PNG per quantity some run logged (top1.png only when some run was evaluated)."""
    written = []
    for quantity in QUANTITIES:
        lines = quantity_lines(runs, quantity)
        if lines:
            written.append(save(line_figure(lines, quantity.ylabel, quantity.ylabel), out / f"{quantity.name}.png"))
    lines, baselines = top1_lines(runs)
    if lines:
        title = "top-1 (%)" + (", dotted: kNN at random init" if baselines else "")
        written.append(save(line_figure(lines, title, "top-1 (%)", baselines), out / "top1.png"))
    return written


# ------------------------------------------------------------------ summary
def _last(series: dict[str, Series], key: str) -> float | None:
    return series[key][1][-1] if key in series else None


def _median(series: dict[str, Series], key: str) -> float | None:
    return statistics.median(series[key][1]) if key in series else None


def summarize(run: RunMetrics) -> RunSummary:
    cfg, series = run.cfg, run.series
    top1 = {}
    for key, kind in TOP1.items():
        if key in series:
            steps, values = series[key]
            best = int(np.argmax(values))
            top1[kind] = (values[best], steps[best], values[-1], steps[-1])
    planned = str(cfg.train.steps) if cfg.train.get("steps") else f"{cfg.train.epochs} epochs"
    return RunSummary(run.label, str(cfg.method.name), str(cfg.model.backbone),
                      series["loss"][0][-1] if "loss" in series else None, planned, _last(series, "loss"), top1,
                      _median(series, "samples_per_s"), _median(series, "data_wait_frac"))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _top1_cell(summary: RunSummary, pick: Callable[[tuple[float, int, float, int]], tuple[float, int]]) -> str:
    if not summary.top1:
        return "no evaluation yet"
    return "; ".join(f"{kind} {pick(t)[0]:.2f} (step {pick(t)[1]})" for kind, t in summary.top1.items())


def summary_markdown(runs: list[RunMetrics], pngs: list[Path], embeddings: dict[str, Path | str],
                     wandb_note: str | None) -> str:
    """A table of the runs, per run its notes (baselines, embedding), then the figures."""
    header = ("| run | method | backbone | steps done / planned | final loss | best top-1 | last top-1 | "
              "samples/s (median) | data wait (median) |")
    lines = ["# sslforge report", "", header, "|" + " --- |" * 9]
    for run in runs:
        s = summarize(run)
        lines.append(f"| {s.label} | {s.method} | {s.backbone} | {_fmt(s.steps_done, 'd')} / {s.planned} | "
                     f"{_fmt(s.final_loss, '.4f')} | {_top1_cell(s, lambda t: t[:2])} | "
                     f"{_top1_cell(s, lambda t: t[2:])} | {_fmt(s.samples_per_s, '.1f')} | "
                     f"{_fmt(s.data_wait_frac, '.1%')} |")
    lines += ["", "## Runs", ""]
    for run in runs:
        lines.append(f"- **{run.label}**: `{run.run_dir}`")
        for key, value in run.baselines.items():
            lines.append(f"  - {TOP1[key]} top-1 at random init: {value:.2f} (the dotted baseline in top1.png; "
                         "not counted as the run's top-1)")
        embedding = embeddings[run.label]
        lines.append(f"  - embedding: [{embedding.name}]({embedding.name})" if isinstance(embedding, Path)
                     else f"  - embedding: none, {embedding}")
    if wandb_note:
        lines += ["", f"Figures logged to {wandb_note}."]
    lines += ["", "## Figures", "", ", ".join(f"[{p.name}]({p.name})" for p in pngs), ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in pngs]
    return "\n".join(lines)


# ------------------------------------------------------------------ wandb
def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the run's latest wandb run, from wandb's `latest-run` link (`*-run-<date>-<id>`)."""
    latest = run_dir / "wandb" / "latest-run"
    return latest.resolve().name.rsplit("-", 1)[-1] if latest.exists() else None


def log_to_wandb(runs: list[RunMetrics], pngs: list[Path], out: Path, flag: str) -> str | None:
    """The figures as wandb.Image: into the run's own wandb run (one run) or a new `report` run
    (several), files under `out`; returns where they went, None when wandb is off (`--wandb
    off`, or `auto` and the first run's logging.wandb_mode disabled; WANDB_MODE overrides)."""
    if flag == "off" or not pngs:
        return None
    logging = runs[0].cfg.logging
    mode = wandb_mode("online" if flag == "on" else str(logging.wandb_mode))
    if mode == "disabled":
        return None
    import wandb

    run_id = wandb_run_id(runs[0].run_dir) if len(runs) == 1 else None
    new = {"name": "report: " + ", ".join(r.label for r in runs), "job_type": "report",
           "config": {"runs": [str(r.run_dir) for r in runs]}}
    run = wandb.init(project=logging.wandb_project, entity=logging.wandb_entity, dir=str(out), mode=mode,
                     **({"id": run_id, "resume": "allow"} if run_id else new))
    run.log({f"report/{png.stem}": wandb.Image(str(png)) for png in pngs})
    note = f"wandb run {run.id} ({mode}{', resumed' if run_id else ', new'})"
    run.finish()
    return note


def write_report(run_dirs: list[Path], out: Path, embedding: str = "tsne", samples: int = 2000,
                 val: str | None = None, wandb_flag: str = "auto", batch_size: int = 256, workers: int = 2) -> Path:
    """Figures, embedding plots and report.md in `out`; returns report.md's path."""
    check_embedding(embedding)
    runs = read_runs(run_dirs)  # every run named in an error before anything is written
    out.mkdir(parents=True, exist_ok=True)
    figures = write_metric_figures(runs, out)
    embeddings = write_embeddings(runs, out, embedding, samples, val, batch_size, workers)
    pngs = [*figures, *(p for p in embeddings.values() if isinstance(p, Path))]
    wandb_note = log_to_wandb(runs, pngs, out, wandb_flag)
    report = out / "report.md"
    report.write_text(summary_markdown(runs, pngs, embeddings, wandb_note))
    return report


__all__ = ["QUANTITIES", "TOP1", "RunMetrics", "metric_series", "quantity_lines", "read_runs", "summarize",
           "top1_lines", "write_report"]
