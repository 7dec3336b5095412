"""`sslforge eval robustness`: a classifier's top-1 on the clean val set, on corrupted copies
of it (ImageNet-C style, `eval.corruptions`) and on extra labelled sets (ImageNet-A/R style).

The val set is read once: each batch is scored clean and then under every corruption and
severity, the corruption applied to the evaluation transform's crop before normalisation.
Every rank scores a contiguous share of the samples (`eval_batches`) and the correct counts are
summed over ranks, so the numbers do not depend on the world size. What is reported (the names
of Hendrycks & Dietterich 2019 and hendrycks/robustness `ImageNet-C/test.py`), in %:

    top1[c][s]      top-1 under corruption c at severity s
    mean_top1[c]    its mean over the severities;   error[c] = 100 - mean_top1[c]
                    (test.py's unnormalised "CE")
    mca             mean of mean_top1 over corruptions ("IN-C" accuracy in the FAN/STL papers)
    mce_unnormalized  mean of error[c] over corruptions (test.py's unnormalised mCE) = 100 - mca
    retention       mca / clean top-1 (a ratio, not %)
    with a baseline (another run's robustness.json, or `alexnet`: AlexNet's published errors,
    which give the paper's normalisation; the mean is over the corruptions evaluated, 12 of the
    paper's 15 at most, and over corruptions computed on the fly, not the stored JPEGs):
    ce[c]           100 * sum_s E[c][s] / sum_s E_base[c][s],   mce = mean of ce[c]
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from sslforge.eval import EvalError
from sslforge.eval.classify import Variant, correct_counts
from sslforge.eval.corruptions import BENCHMARK, SEVERITIES, check_corruptions, corrupt, sample_seeds
from sslforge.eval.features import with_rank0_buffers
from sslforge.launcher.env import DistEnv

RESULT_FILE = "robustness.json"


def summarize(clean_top1: float, top1: dict[str, dict[int, float]]) -> dict[str, Any]:
    """Means over severities and corruptions, unnormalised errors (in %) and retention (a ratio)."""
    corruptions = {}
    for name, per_severity in top1.items():
        mean = sum(per_severity.values()) / len(per_severity)
        corruptions[name] = {"top1": {str(s): v for s, v in per_severity.items()}, "mean_top1": mean,
                             "error": 100.0 - mean}
    result: dict[str, Any] = {"clean_top1": clean_top1, "corruptions": corruptions}
    if corruptions:
        mca = sum(c["mean_top1"] for c in corruptions.values()) / len(corruptions)
        result.update(mca=mca, mce_unnormalized=sum(c["error"] for c in corruptions.values()) / len(corruptions),
                      retention=mca / clean_top1 if clean_top1 > 0 else None)
    return result


# AlexNet's corruption errors (%, mean over severities 1-5) on the stored ImageNet-C, as
# google-research/augmix `imagenet.py` (ALEXNET_ERR) took them from hendrycks/robustness; the
# denominators of the paper's mCE (`--baseline alexnet`). Only the corruptions computed here.
ALEXNET_ERRORS = {"gaussian_noise": 88.6428, "shot_noise": 89.4468, "impulse_noise": 92.2640,
                  "defocus_blur": 81.9880, "motion_blur": 78.5948, "zoom_blur": 79.8360, "snow": 86.6816,
                  "fog": 81.9324, "brightness": 56.4592, "contrast": 85.3204, "pixelate": 71.7840,
                  "jpeg_compression": 60.6500}
ALEXNET_BASELINE = {"name": "alexnet", "clean_top1": None,
                    "corruptions": {name: {"error": error} for name, error in ALEXNET_ERRORS.items()}}


def _baseline_error_sum(baseline: dict[str, Any], name: str, severities: list[str]) -> float:
    """The baseline's errors on `name` summed over `severities`: from its per-severity top-1,
    or from a mean over all five severities (the AlexNet table) when all five are evaluated."""
    entry = baseline.get("corruptions", {}).get(name)
    if not isinstance(entry, dict):
        raise EvalError(f"the baseline has no results for {name}")
    if "top1" in entry:
        missing = [s for s in severities if s not in entry["top1"]]
        if missing:
            raise EvalError(f"the baseline has no top-1 for {name} at severities {missing}")
        return sum(100.0 - entry["top1"][s] for s in severities)
    if sorted(severities) != [str(s) for s in SEVERITIES]:
        raise EvalError(f"the baseline's error on {name} is a mean over severities 1-5: evaluate all five")
    return entry["error"] * len(severities)


def add_normalized_ce(result: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Adds ce[c] = 100 * sum_s E[c][s] / sum_s E_base[c][s] and mce, their mean (the paper's
    mCE over these corruptions when the baseline is AlexNet)."""
    for name, entry in result["corruptions"].items():
        base_error = _baseline_error_sum(baseline, name, list(entry["top1"]))
        if base_error <= 0:
            raise EvalError(f"the baseline makes no error on {name}: CE is undefined")
        entry["ce"] = 100.0 * sum(100.0 - v for v in entry["top1"].values()) / base_error
    result["mce"] = sum(e["ce"] for e in result["corruptions"].values()) / len(result["corruptions"])
    result["baseline_clean_top1"] = baseline.get("clean_top1")


def _extra_set(classifier: nn.Module, shards: str, image_size: int, env: DistEnv, batch_size: int,
               workers: int) -> dict[str, Any]:
    """Plain top-1 on a set's own labels (ImageNet-A/R style; no 200-class sub-selection)."""
    counts = correct_counts(classifier, shards, image_size, env, batch_size, workers)
    return {"shards": shards, "top1": 100.0 * counts.top1[0] / counts.samples, "samples": counts.samples,
            "skipped": counts.skipped}


@contextmanager
def _progress(shards: str, variants: int, env: DistEnv) -> Iterator[Callable[[int], None] | None]:
    """On rank 0, a progress bar over its share of the val set (each image is scored clean and
    under every corruption and severity: the long part on a real val set); elsewhere nothing."""
    if not env.is_main:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sslforge.data_pipeline.planning import ShardSet
    from sslforge.data_pipeline.shards import expand_shards

    share = ShardSet.open(expand_shards(shards)).total // env.world_size
    with Progress(TextColumn(f"[bold]scoring {variants + 1} versions of each image"), BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("images", total=share)
        yield lambda n: bar.advance(task, n)


def _corruption(name: str, severity: int, seed: int) -> Variant:
    """Corruption `name` at `severity`, each sample's draws keyed by its index and `seed`."""
    return lambda images, index: corrupt(images, name, severity, sample_seeds(seed, name, severity, index))


def evaluate_robustness(classifier: nn.Module, val_shards: str, image_size: int, env: DistEnv,
                        batch_size: int = 256, workers: int = 2, corruptions: Sequence[str] = BENCHMARK,
                        severities: Sequence[int] = SEVERITIES, extra_sets: dict[str, str] | None = None,
                        baseline: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Clean, per-corruption and extra-set top-1 of `classifier` (image -> logits, on env.device,
    run in eval mode with rank 0's buffers, its mode restored after); the same dict on every rank.
    Corrupted images are the same for a given `seed` whatever the world size or batch size."""
    check_corruptions(list(corruptions), list(severities))
    if baseline is not None:
        if not corruptions:
            raise EvalError("a baseline normalises corruption errors: give at least one corruption")
        for name in corruptions:  # before the long part: it covers what is asked
            _baseline_error_sum(baseline, name, [str(s) for s in severities])
    model = with_rank0_buffers(classifier)
    was_training = model.training
    model.eval()
    try:
        variants = [(name, s) for name in corruptions for s in severities]
        with _progress(val_shards, len(variants), env) as advance:
            counts = correct_counts(model, val_shards, image_size, env, batch_size, workers,
                                    [_corruption(name, s, seed) for name, s in variants], advance)
        samples = counts.samples
        top1: dict[str, dict[int, float]] = {name: {} for name in corruptions}
        for (name, severity), h in zip(variants, counts.top1[1:]):
            top1[name][severity] = 100.0 * h / samples
        result = summarize(100.0 * counts.top1[0] / samples, top1)
        result.update(samples=samples, skipped=counts.skipped, severities=list(severities), seed=seed, val=val_shards,
                      extra={name: _extra_set(model, spec, image_size, env, batch_size, workers)
                             for name, spec in (extra_sets or {}).items()})
    finally:
        model.train(was_training)
    if baseline is not None:
        add_normalized_ce(result, baseline)
    return result


def _cell(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def robustness_table(result: dict[str, Any]) -> Table:
    """Top-1 per corruption and severity, the means, errors, CE and the summary rows."""
    severities = [str(s) for s in result["severities"]]
    has_ce = "mce" in result
    table = Table(title=f"robustness of step {result.get('step', '?')} on {result['val']} "
                        f"({result['samples']} images)")
    for column in ["set", *[f"s{s}" for s in severities], "top-1", "error", *(["CE"] if has_ce else [])]:
        table.add_column(column, justify="left" if column == "set" else "right")

    def row(name: str, top1: float | None, error: float | None = None, ce: float | None = None,
            per_severity: list[str] | None = None, digits: int = 2) -> None:
        cells = [*(per_severity or [""] * len(severities)), _cell(top1, digits), _cell(error)]
        table.add_row(name, *cells, *([_cell(ce, 1)] if has_ce else []))

    row("clean", result["clean_top1"])
    for name, entry in result["corruptions"].items():
        row(name, entry["mean_top1"], entry["error"], entry.get("ce"), [_cell(entry["top1"][s]) for s in severities])
    if result["corruptions"]:
        table.add_section()
        row("mean over corruptions (mCA, mCE)", result["mca"], result["mce_unnormalized"], result.get("mce"))
        row("retention (mCA / clean)", result["retention"], digits=3)
    for name, entry in result["extra"].items():
        row(f"extra: {name}", entry["top1"])
    return table


def _metrics_record(result: dict[str, Any]) -> dict[str, Any]:
    record = {"step": result["step"], "eval": "robustness", "clean_top1": result["clean_top1"]}
    record.update({k: result[k] for k in ("mca", "mce_unnormalized", "retention", "mce") if k in result})
    record.update({f"top1/{name}": entry["top1"] for name, entry in result["extra"].items()})
    return record


def load_baseline(source: str | Path) -> dict[str, Any]:
    """`alexnet` (AlexNet's published errors) or another run's robustness.json."""
    if str(source) == "alexnet":
        return ALEXNET_BASELINE
    try:
        baseline = json.loads(Path(source).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"baseline {source} is not a readable robustness.json: {exc}") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("corruptions"), dict):
        raise EvalError(f"baseline {source} has no per-corruption results (a robustness.json is expected)")
    return baseline


def robustness_from_run(source: Path, val: str | None = None, extra_sets: dict[str, str] | None = None,
                        corruptions: Sequence[str] = BENCHMARK, severities: Sequence[int] = SEVERITIES,
                        baseline: str | Path | None = None, batch_size: int = 256, workers: int = 2,
                        seed: int = 0) -> dict[str, Any]:
    """Score the classifier of the run at `source` (run or checkpoint directory) on `val` (default
    the run's data.val); rank 0 prints the table, writes RUN_DIR/robustness.json and appends a
    record to metrics.jsonl. Returns the result."""
    from sslforge.eval.run import append_metrics, load_method
    from sslforge.launcher.env import init_distributed

    check_corruptions(list(corruptions), list(severities))
    reference = load_baseline(baseline) if baseline is not None else None
    env = init_distributed("auto")
    run_dir, cfg, method, step = load_method(source)
    classifier = method.classifier()
    if classifier is None:
        raise EvalError(f"method {cfg.method.name} has no classifier (a self-supervised method): "
                        "robustness scores supervised runs")
    val = val or cfg.data.val
    if not val:
        raise EvalError(f"no val shards: pass --val or set data.val in {run_dir / 'config.yaml'}")
    result = evaluate_robustness(classifier.to(env.device), val, cfg.data.image_size, env, batch_size, workers,
                                 corruptions, severities, extra_sets, reference, seed)
    result.update(step=step, source=str(source), run_dir=str(run_dir), baseline=str(baseline) if baseline else None)
    if env.is_main:
        Console().print(robustness_table(result))
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
        append_metrics(run_dir, _metrics_record(result))
    return result


__all__ = ["ALEXNET_BASELINE", "RESULT_FILE", "add_normalized_ce", "evaluate_robustness", "load_baseline",
           "robustness_from_run", "robustness_table", "summarize"]
