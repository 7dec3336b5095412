"""`sslforge report`: figures and summary of a real run directory (the session's pretrained
SimCLR run, read only: everything is written under tmp_path), a run resumed over logged steps,
a run not yet evaluated, several runs overlaid, the t-SNE of val embeddings, wandb offline."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from sslforge import report_embedding
from sslforge.eval import EvalError
from sslforge.report import (
    QUANTITIES,
    TOP1,
    quantity_lines,
    read_runs,
    summarize,
    top1_lines,
    write_report,
)
from sslforge.report_plots import line_figure
from tests.conftest import rank_variables_kept
from tests.test_cli import sslforge

TSNE_SAMPLES = 300
CRASH_AT, RESUMED_FROM = 150, 100  # the first life logged up to 150; the checkpoint it resumed from is 100


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_series(records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per metric, step -> value of the last non-random-init record holding it, written out here."""
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        if not r.get("random_init"):
            for key, value in r.items():
                if key not in ("step", "time") and type(value) in (int, float):
                    expected.setdefault(key, {})[r["step"]] = value
    return expected


def _as_dict(series: tuple[list[int], list[float]]) -> dict[int, float]:
    steps, values = series
    assert steps == sorted(set(steps)), "each step once, in order"
    return dict(zip(steps, values))


def _run_copy(src: Path, dst: Path, records: list[dict[str, Any]], name: str | None = None,
              cut_line: bool = False) -> Path:
    """A run directory holding `src`'s config (renamed to `name`) and the given metrics, no checkpoint."""
    dst.mkdir(parents=True)
    config = (src / "config.yaml").read_text()
    (dst / "config.yaml").write_text(config.replace("name: ", f"name: {name}  # was ", 1) if name else config)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (dst / "metrics.jsonl").write_text(text + ('{"step": 999, "loss": 1.2' if cut_line else ""))
    return dst


@pytest.fixture(scope="module")
def made(pretrained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The report of the real run (t-SNE of 300 val samples, wandb off) into tmp; the embedding
    figures it draws are kept for inspection; the run itself must stay as it was."""
    out = tmp_path_factory.mktemp("report")
    before = sorted((p.relative_to(pretrained_run), p.stat().st_mtime) for p in pretrained_run.rglob("*"))
    drawn: list[tuple[Any, Any]] = []

    def spy(embedding: Any, title: str) -> Any:
        fig = original(embedding, title)
        drawn.append((embedding, fig))
        return fig

    original = report_embedding.embedding_figure
    with pytest.MonkeyPatch.context() as mp, rank_variables_kept():  # the t-SNE's features: in this process
        mp.setattr(report_embedding, "embedding_figure", spy)
        report = write_report([pretrained_run], out, "tsne", TSNE_SAMPLES, wandb_flag="off", workers=0)
    after = sorted((p.relative_to(pretrained_run), p.stat().st_mtime) for p in pretrained_run.rglob("*"))
    assert after == before, "the report wrote into the run directory"
    yield {"out": out, "report": report, "records": _records(pretrained_run / "metrics.jsonl"), "drawn": drawn}


def test_series_are_the_records_of_metrics_jsonl(pretrained_run: Path, made: dict[str, Any]) -> None:
    run = read_runs([pretrained_run])[0]
    expected = _expected_series(made["records"])
    assert set(run.series) == set(expected)
    for key, by_step in expected.items():
        assert _as_dict(run.series[key]) == pytest.approx(by_step), key
    assert run.series["loss"][0][-1] == max(r["step"] for r in made["records"] if "loss" in r)
    assert "knn_top1" in run.series  # the trainer's final evaluation


def test_figures_are_images_drawing_those_series(pretrained_run: Path, made: dict[str, Any]) -> None:
    out = made["out"]
    names = {p.name for p in out.glob("*.png")}
    assert {f"{q.name}.png" for q in QUANTITIES} | {"top1.png", "embedding_simclr-synth.png"} == names
    for name in names:
        with Image.open(out / name) as image:
            image.load()
            assert image.width >= 400 and image.height >= 300, name
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, f"{name} looks blank"
    run = read_runs([pretrained_run])[0]
    for quantity in QUANTITIES:
        lines = quantity_lines([run], quantity)
        ax = line_figure(lines, quantity.name, quantity.ylabel).axes[0]
        assert [line.get_label() for line in ax.lines] == ["simclr-synth"]  # the run's config name
        steps, values = run.series[quantity.name]
        assert np.array_equal(ax.lines[0].get_xydata(), np.column_stack([steps, values]))


def test_summary_numbers_are_the_records(pretrained_run: Path, made: dict[str, Any]) -> None:
    records = made["records"]
    train = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
    knn = _expected_series(records)["knn_top1"]  # step -> the last value logged at it
    summary = summarize(read_runs([pretrained_run])[0])
    assert (summary.method, summary.backbone, summary.planned) == ("simclr", "resnet10", "200")
    assert summary.steps_done == train[-1]["step"] == 200
    assert summary.final_loss == train[-1]["loss"]
    assert summary.samples_per_s == pytest.approx(float(np.median([r["samples_per_s"] for r in train])))
    best, best_step, last, last_step = summary.top1["kNN"]
    assert (best, last, last_step) == (max(knn.values()), knn[max(knn)], max(knn))
    assert knn[best_step] == best
    row = next(line for line in made["report"].read_text().splitlines() if line.startswith("| simclr-synth |"))
    assert f"| 200 / 200 | {train[-1]['loss']:.4f} |" in row
    assert f"kNN {knn[max(knn)]:.2f} (step {max(knn)})" in row
    assert "(embedding_simclr-synth.png)" in made["report"].read_text()


def test_tsne_has_one_colour_per_label(made: dict[str, Any]) -> None:
    [(embedding, fig)] = made["drawn"]
    assert embedding.points.shape == (TSNE_SAMPLES, 2) and embedding.step == 200
    present = sorted(set(embedding.labels.tolist()))
    assert present == list(range(10))  # the shapes' 10 classes among 300 samples
    ax = fig.axes[0]
    colours = [to_hex(c.get_facecolor()[0]) for c in ax.collections]
    assert len(ax.collections) == len(present) == len(set(colours))
    for collection, label in zip(ax.collections, present):
        assert len(collection.get_offsets()) == int((embedding.labels == label).sum())
        assert {to_hex(c) for c in collection.get_facecolor()} == {colours[present.index(label)]}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == embedding.class_names


def test_resumed_run_keeps_each_step_once_the_later_value(pretrained_run: Path, made: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """The first life logged to CRASH_AT with other values and died mid-line; the second resumed
    from RESUMED_FROM and re-logged those steps: the report shows the second life's values."""
    records = made["records"]
    first = [r if r["step"] <= RESUMED_FROM else {**r, "loss": r["loss"] + 100.0, "lr": 9.0}
             for r in records if "loss" in r and r["step"] <= CRASH_AT]
    second = [r for r in records if r["step"] > RESUMED_FROM]
    lines = "".join(json.dumps(r) + "\n" for r in first) + '{"step": 160, "loss": 4.2, "lr"\n'
    run_dir = _run_copy(pretrained_run, tmp_path / "resumed", [])
    (run_dir / "metrics.jsonl").write_text(lines + "".join(json.dumps(r) + "\n" for r in second))
    resumed, clean = read_runs([run_dir, pretrained_run])
    for key in ("loss", "lr", "samples_per_s"):
        assert _as_dict(resumed.series[key]) == _as_dict(clean.series[key]), key
    loss = line_figure(quantity_lines([resumed], QUANTITIES[0]), "loss", "loss").axes[0].lines[0]
    assert max(loss.get_ydata()) < 100.0  # no value of the first life's re-done steps is drawn
    assert list(loss.get_xdata()) == sorted({r["step"] for r in records if "loss" in r})


def test_random_init_knn_is_a_baseline_not_the_runs_top1(pretrained_run: Path, made: dict[str, Any],
                                                        tmp_path: Path) -> None:
    baseline = {"step": 0, "eval": "knn", "knn_top1": 99.5, "k": 20, "random_init": True}
    run = read_runs([_run_copy(pretrained_run, tmp_path / "r", [*made["records"], baseline])])[0]
    assert run.baselines == {"knn_top1": 99.5}
    assert 0 not in run.series["knn_top1"][0]
    assert summarize(run).top1["kNN"][0] < 99.5
    lines, baselines = top1_lines([run])
    ax = line_figure(lines, "top-1", "top-1 (%)", baselines).axes[0]
    dotted = [line for line in ax.lines if line.get_label() == "simclr-synth kNN at random init"]
    assert len(dotted) == 1 and set(dotted[0].get_ydata()) == {99.5}


def test_run_not_evaluated_yet(pretrained_run: Path, made: dict[str, Any], tmp_path: Path) -> None:
    """Training records to step 100 only, no checkpoint, a crash-cut last line: figures without
    top-1, the summary says there is no evaluation and no embedding yet."""
    early = [r for r in made["records"] if "loss" in r and r["step"] <= 100]
    run_dir = _run_copy(pretrained_run, tmp_path / "young", early, cut_line=True)
    report = write_report([run_dir], tmp_path / "out", "tsne", TSNE_SAMPLES, wandb_flag="off", workers=0)
    assert {p.name for p in report.parent.glob("*.png")} == {f"{q.name}.png" for q in QUANTITIES}
    text = report.read_text()
    assert "| 100 / 200 |" in text and text.count("no evaluation yet") == 2  # best and last
    assert "embedding: none, no checkpoint yet" in text


def test_several_runs_are_overlaid_with_a_legend_entry_each(pretrained_run: Path, made: dict[str, Any],
                                                            tmp_path: Path) -> None:
    other = _run_copy(pretrained_run, tmp_path / "other", [r for r in made["records"] if r["step"] <= 100],
                      name="short-run")
    twin = _run_copy(pretrained_run, tmp_path / "twin", made["records"])  # same config name as the real run
    runs = read_runs([pretrained_run, other, twin])
    assert [r.label for r in runs] == ["simclr-synth (simclr)", "short-run", "simclr-synth (twin)"]
    for quantity in QUANTITIES:
        ax = line_figure(quantity_lines(runs, quantity), quantity.name, quantity.ylabel).axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [r.label for r in runs]
        assert len({to_hex(line.get_color()) for line in ax.lines}) == 3
    lines, _ = top1_lines(runs)  # the short run was not evaluated yet
    assert {line.label for line in lines if line.label.endswith(TOP1["knn_top1"])} == {
        "simclr-synth (simclr) kNN", "simclr-synth (twin) kNN"}


def test_missing_metrics_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    result = sslforge("report", str(tmp_path / "run"), "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"{tmp_path / 'run'} has no metrics.jsonl" in result.stderr
    assert not (tmp_path / "out").exists()


def test_umap_without_the_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError
    with pytest.raises(EvalError, match="umap-learn"):
        report_embedding.check_embedding("umap")


def test_figures_logged_to_the_runs_wandb_offline(pretrained_run: Path, tmp_path: Path) -> None:
    """The run's own wandb run resumed by its id (offline: under --out), holding every figure."""
    [trained] = list((pretrained_run / "wandb").glob("offline-run-*"))
    run_id = trained.name.rsplit("-", 1)[1]
    result = sslforge("report", str(pretrained_run), "--out", str(tmp_path), "--embedding", "none",
                      "--wandb", "on", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    [logged] = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    media = {p.name.split("_0_")[0] for p in (logged / "files" / "media" / "images" / "report").glob("*.png")}
    assert media == {p.stem for p in tmp_path.glob("*.png")} == {q.name for q in QUANTITIES} | {"top1"}
    assert f"wandb run {run_id} (offline, resumed)" in (tmp_path / "report.md").read_text()
    assert not (pretrained_run / "report").exists()
