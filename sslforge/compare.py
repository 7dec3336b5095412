"""`sslforge compare`: train several recipes or options on the same data, budget and seed, and
write one table (and a plot) of top-1 and wall time per variant.

A variant is `recipe` or `recipe:key=value,key=value` (e.g. `simclr_synth:method.loss=dcl`),
optionally named `label=recipe:...`. Every variant's config is loaded and checked before the
first one trains, and they must agree on what makes the comparison fair: the data, the seed and
the budget (epochs or steps, global batch); `--set key=value` applies to all of them. Each trains
through `sslforge train` on `--nproc` local ranks into `<out>/<label>`; its top-1 is the
trainer's final evaluation on `data.val`: the weighted kNN of a self-supervised encoder, the
classifier's own top-1 for a supervised method (the table says which).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from sslforge.config import ConfigError, load_config

EVALUATIONS = {"knn_top1": "kNN", "val_top1": "classifier"}  # the trainer's final evaluation
FAIR = ("data.train", "data.val", "train.seed", "train.epochs", "train.steps", "optim.batch_size")


@dataclass
class Variant:
    label: str
    recipe: str
    overrides: list[str]


@dataclass
class Outcome:
    label: str
    top1: float
    evaluation: str  # the metrics.jsonl key it came from: knn_top1 | val_top1
    minutes: float
    final_loss: float
    embedding_std: float | None


def parse_variant(spec: str) -> Variant:
    """`[label=]recipe[:key=value,...]`; the label defaults to the recipe plus its overrides."""
    label = None
    head, _, rest = spec.partition(":")
    if "=" in head:
        label, head = head.split("=", 1)
    overrides = [o for o in rest.split(",") if o] if rest else []
    bad = [o for o in overrides if "=" not in o]
    if not head or bad:
        raise ConfigError(f"bad variant {spec!r}: expected [label=]recipe[:key=value,...]")
    name = label or "-".join([head, *(o.split("=", 1)[1] for o in overrides)])
    return Variant(name.replace("/", "_"), head, overrides)


def load_variants(specs: list[str], shared: list[str], out: Path) -> list[tuple[Variant, DictConfig]]:
    """Every variant's validated config; refuses duplicates and unfair comparisons."""
    loaded = []
    for variant in map(parse_variant, specs):
        cfg = load_config(variant.recipe, [*variant.overrides, *shared, f"run_dir={out / variant.label}"])
        loaded.append((variant, cfg))
    labels = [v.label for v, _ in loaded]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two variants share a label: {labels}; name them with label=recipe:...")
    for key in FAIR:
        values = {v.label: _select(cfg, key) for v, cfg in loaded}
        if len(set(map(str, values.values()))) > 1:
            raise ConfigError(f"variants differ in {key} ({values}): a comparison needs the same data, seed and "
                              f"budget; set it for all with --set {key}=...")
    if any(cfg.data.val is None for _, cfg in loaded):
        raise ConfigError("compare measures top-1 on data.val: every variant needs one")
    return loaded


def _select(cfg: DictConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = node[part]  # type: ignore[index]
    return node


def train_variant(variant: Variant, cfg: DictConfig, shared: list[str], out: Path, nproc: int) -> Outcome:
    run_dir = out / variant.label
    cmd = [sys.executable, "-m", "sslforge.cli", "train", variant.recipe, *variant.overrides, *shared,
           f"run_dir={run_dir}", "--nproc", str(nproc)]
    print("$ sslforge " + " ".join(cmd[3:]), flush=True)
    started = time.time()
    result = subprocess.run(cmd)
    minutes = (time.time() - started) / 60
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant.label} failed with exit status {result.returncode}; see {run_dir}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(key, r[key]) for r in records for key in EVALUATIONS if key in r]
    losses = [r["loss"] for r in records if "loss" in r]
    spread = [r["embedding_std"] for r in records if "embedding_std" in r]
    return Outcome(variant.label, evals[-1][1], evals[-1][0], minutes, losses[-1], spread[-1] if spread else None)


def write_report(outcomes: list[Outcome], out: Path, title: str) -> Path:
    """compare.json, compare.md (the table) and compare.png (top-1 and minutes per variant)."""
    (out / "compare.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    lines = [f"{title}", "", "| variant | top-1 | evaluation | minutes | final loss | embedding std |",
             "| --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        spread = "-" if o.embedding_std is None else f"{o.embedding_std:.3f}"
        lines.append(f"| {o.label} | {o.top1:.1f}% | {EVALUATIONS[o.evaluation]} | {o.minutes:.1f} | "
                     f"{o.final_loss:.3f} | {spread} |")
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(table)
    _plot(outcomes, out / "compare.png", title)
    return out / "compare.md"


def _plot(outcomes: list[Outcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [o.label for o in outcomes]
    fig, (acc, wall) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(labels) + 4), 4))
    acc.bar(labels, [o.top1 for o in outcomes], color="tab:blue")
    acc.set_ylabel("top-1 (%): " + ", ".join(sorted({EVALUATIONS[o.evaluation] for o in outcomes})))
    wall.bar(labels, [o.minutes for o in outcomes], color="tab:gray")
    wall.set_ylabel("wall time (min)")
    for ax in (acc, wall):
        ax.tick_params(axis="x", labelrotation=45)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(specs: list[str], shared: list[str], out: Path, nproc: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_variants(specs, shared, out)  # every config checked before anything trains
    cfg = loaded[0][1]
    budget = f"{cfg.train.steps} steps" if cfg.train.steps else f"{cfg.train.epochs} epochs"
    title = f"top-1 on {Path(str(cfg.data.val)).name}, {budget} of batch {cfg.optim.batch_size}, seed {cfg.train.seed}"
    outcomes = [train_variant(v, c, shared, out, nproc) for v, c in loaded]
    return write_report(outcomes, out, title)
