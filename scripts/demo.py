"""`make demo`: built-in data -> SimCLR on 2 local ranks -> kNN top-1 against a random-init encoder.

Runs the real CLI commands a user would type, so what it prints is what they would see.
Settings can be changed by passing `key=value` overrides, e.g. `python scripts/demo.py train.epochs=2`.
`--methods simclr,byol,...` (or `--methods all`: every self-supervised method) trains each
method's `_synth` preset in turn and prints the README's table: kNN top-1 of each encoder and of
the same encoder at random init, the final embedding spread (collapse shows as a std near 0) and
the minutes each run took. `--stl` trains STL's token labeler, then its student and the same
student without token labels (`supervised_synth`), scores both on the clean and corrupted val
split (`sslforge eval robustness`) and prints the README's STL table. `--generative` writes the
captioned built-in data, trains the VAE, a dual encoder (the R-precision scorer) and XMC-GAN,
and prints the README's table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo_runs" / "data"
RUNS = ROOT / "demo_runs"
CAPTIONED = ROOT / "demo_runs" / "data_captioned"


def sslforge(*args: str, capture: bool = False) -> str:
    """Run one CLI command as a user would; its output goes to the console (and is returned
    when `capture`, for the commands whose result the demo reads)."""
    cmd = [sys.executable, "-m", "sslforge.cli", *args]
    print("$ sslforge " + " ".join(args), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True)
    if capture:
        print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        sys.exit(f"demo: `sslforge {args[0]}` failed with exit status {result.returncode}")
    return result.stdout or ""


def knn_top1(run: Path, *flags: str) -> float:
    knn = ["--train", str(DATA / "train"), "--val", str(DATA / "val")]
    return float(sslforge("eval", "knn", str(run), *knn, *flags, capture=True).split()[-1])


def last_embedding_std(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "embedding_std" in r][-1]["embedding_std"]


def train_and_measure(method: str, overrides: list[str]) -> dict[str, float]:
    """Train `<method>_synth` on 2 local ranks from scratch; kNN of its encoder, trained and at
    random init, the last logged embedding std, and the training minutes."""
    run = RUNS / f"{method}_synth"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
    started = time.time()
    sslforge("train", f"{method}_synth", f"data.train={DATA / 'train'}", f"data.val={DATA / 'val'}",
             f"run_dir={run}", *overrides, "--nproc", "2")
    minutes = (time.time() - started) / 60
    result = {"trained": knn_top1(run), "random_init": knn_top1(run, "--random-init"),
              "embedding_std": last_embedding_std(run), "minutes": minutes}
    (run / "demo_result.json").write_text(json.dumps(result))
    return result


def train_supervised(preset: str, run: Path, overrides: list[str]) -> dict[str, float]:
    """Train a supervised preset on 2 local ranks from scratch; its last val top-1, the clean and
    corrupted top-1 of `eval robustness`, and the training minutes."""
    shutil.rmtree(run, ignore_errors=True)
    started = time.time()
    sslforge("train", preset, f"data.train={DATA / 'train'}", f"data.val={DATA / 'val'}", f"run_dir={run}",
             *overrides, "--nproc", "2")
    minutes = (time.time() - started) / 60
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if preset == "stl_labeler_synth":
        return {"val_top1": [r["val_top1"] for r in records if "val_top1" in r][-1], "minutes": minutes}
    sslforge("eval", "robustness", str(run))
    robust = json.loads((run / "robustness.json").read_text())
    return {"val_top1": [r["val_top1"] for r in records if "val_top1" in r][-1], "clean": robust["clean_top1"],
            "mca": robust["mca"], "retention": robust["retention"], "minutes": minutes}


def stl_comparison(overrides: list[str]) -> None:
    """STL's two stages against the same student without token labels, on the built-in data."""
    labeler = RUNS / "stl_labeler_synth"
    results = {"stl_labeler_synth": train_supervised("stl_labeler_synth", labeler, overrides)}
    results["stl_student_synth"] = train_supervised("stl_student_synth", RUNS / "stl_student_synth",
                                                    [f"method.labeler={labeler}", *overrides])
    results["supervised_synth"] = train_supervised("supervised_synth", RUNS / "supervised_synth", overrides)
    print()
    print("| run | val top-1 (EMA) | mCA, 12 corruptions x 5 severities | retention | minutes |")
    print("| --- | --- | --- | --- | --- |")
    for preset, r in results.items():
        robust = f"{r['mca']:.1f}% | {r['retention']:.3f}" if "mca" in r else "- | -"
        print(f"| {preset} | {r['val_top1']:.1f}% | {robust} | {r['minutes']:.1f} |")


def metric_series(run: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def train_on_captions(preset: str, run: Path, overrides: list[str]) -> float:
    """Train a preset on the captioned built-in data on 2 local ranks from scratch; minutes."""
    shutil.rmtree(run, ignore_errors=True)
    started = time.time()
    sslforge("train", preset, f"data.train={CAPTIONED / 'train'}", f"data.val={CAPTIONED / 'val'}",
             f"run_dir={run}", *overrides, "--nproc", "2")
    return (time.time() - started) / 60


def generative(overrides: list[str]) -> None:
    """The VAE's val ELBO over training, and XMC-GAN's R-precision against chance, scored by a
    dual encoder trained separately (seed 1) on the same captions."""
    if not (CAPTIONED / "val").is_dir():
        sslforge("data", "synth", str(CAPTIONED), "--train", "10000", "--val", "2000", "--captions")
    rows = []
    minutes = train_on_captions("vae_synth", RUNS / "vae_synth", overrides)
    elbo, bpd = metric_series(RUNS / "vae_synth", "val_elbo"), metric_series(RUNS / "vae_synth", "val_bpd")
    rows.append(("vae_synth", f"val ELBO {elbo[0]:.1f} -> {elbo[-1]:.1f} nats ({bpd[-1]:.2f} bits/dim)", minutes))
    scorer = RUNS / "dual_encoder_synth"
    minutes = train_on_captions("dual_encoder_synth", scorer, ["train.seed=1", *overrides])
    real = metric_series(scorer, "val_r_precision")[-1]
    rows.append(("dual_encoder_synth (seed 1, the scorer)", f"R-precision of the real val images {100 * real:.1f}%",
                 minutes))
    minutes = train_on_captions("xmcgan_synth", RUNS / "xmcgan_synth", [f"eval.dual_encoder={scorer}", *overrides])
    r_precision = metric_series(RUNS / "xmcgan_synth", "r_precision")
    rows.append(("xmcgan_synth", f"R-precision of the EMA generator's images {100 * r_precision[-1]:.1f}% "
                 "(chance 1.0%)", minutes))
    print()
    print("| run | result on the built-in val split | minutes |")
    print("| --- | --- | --- |")
    for run, result, mins in rows:
        print(f"| {run} | {result} | {mins:.1f} |")
    print(f"sample grids: {RUNS}/vae_synth/images, {RUNS}/xmcgan_synth/images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="simclr", help="comma-separated, or `all` (the self-supervised ones)")
    parser.add_argument("--stl", action="store_true", help="STL's labeler, student and supervised baseline instead")
    parser.add_argument("--generative", action="store_true", help="the VAE and XMC-GAN on captioned built-in data instead")
    args, overrides = parser.parse_known_args()
    from sslforge.methods import METHODS, Method

    if not (DATA / "val").is_dir():
        sslforge("data", "synth", str(DATA), "--train", "10000", "--val", "2000")
    if args.stl:
        stl_comparison(overrides)
        return
    if args.generative:
        generative(overrides)
        return
    self_supervised = [m for m, cls in METHODS.items() if cls.classifier is Method.classifier
                       and cls.evaluate is Method.evaluate and not cls.needs_captions]
    methods = self_supervised if args.methods == "all" else args.methods.split(",")
    started = time.time()
    results = {method: train_and_measure(method, overrides) for method in methods}
    print()
    print(f"kNN top-1 (k=20, T=0.07) on the built-in val split, {time.time() - started:.0f}s in all:")
    print("| method | random init | trained | embedding std | minutes |")
    print("| --- | --- | --- | --- | --- |")
    for method, r in results.items():
        print(f"| {method} | {r['random_init']:.1f}% | {r['trained']:.1f}% | {r['embedding_std']:.3f} "
              f"| {r['minutes']:.1f} |")
    print(f"run directories: {RUNS}/<method>_synth (config.yaml, metrics.jsonl, checkpoints/, wandb/)")


if __name__ == "__main__":
    main()
