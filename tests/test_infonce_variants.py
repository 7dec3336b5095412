"""The InfoNCE family as methods and options: SimCLR's `method.loss` variants, MoCo v2's
`method.hard_negatives` and the `supcon` method each take one step on 2 ranks with B/2 equal to
1 rank with B; options that do not fit a method are refused when the recipe is loaded, before any
process starts; SupCon refuses a training sample without a label, naming its shard; `sslforge
compare` trains variants on one budget and writes its table and plot.

The losses themselves are checked against straightforward computations in
test_supcon_dcl_debiased.py and test_fnc_mochi_directclr.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sslforge.config import ConfigError
from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.shards import write_shards
from sslforge.data_pipeline.stream import ShardLoader
from tests.data_helpers import png_bytes, small_views
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import assert_two_ranks_equal_one, one_step_of, tiny_config

SGD = ["optim.name=sgd", "optim.base_lr=1.0", "model.sync_bn=true"]  # see test_moco.py: SGD, SyncBN
SIMCLR = {
    "dcl": ["method.loss=dcl"],
    "dclw": ["method.loss=dclw"],
    "debiased": ["method.loss=debiased", "method.temperature=0.5"],
    "fnc": ["method.loss=fnc", "method.fnc_support_views=2", "data.views.0.count=4", "method.fnc_topk=2",
            "method.fnc_threshold=0.0"],  # every candidate scores above 0: false negatives on both ranks
    "directclr": ["method.loss=directclr", "method.directclr_dims=64"],
}
CASES = [("simclr_synth", [*SGD, *o]) for o in SIMCLR.values()] + [
    ("moco_v2_synth", [*SGD, "method.queue_size=16", "method.shuffle_bn=false", "method.momentum=0.9",
                       "method.hard_negatives=true", "method.hard_start_epoch=0", "method.hard_num=8",
                       "method.hard_mix=4", "method.hard_mix_query=2"]),
    ("supcon_synth", SGD),
]


@pytest.mark.parametrize("recipe, overrides", CASES, ids=[*SIMCLR, "mochi", "supcon"])
def test_one_step_two_ranks_equal_one_rank(tmp_path: Path, recipe: str, overrides: list[str]) -> None:
    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), recipe, *overrides)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), recipe, *overrides)
    assert_two_ranks_equal_one(single, pair, 1e-5)


def test_directclr_trains_the_representation_without_a_projector(tmp_path: Path) -> None:
    (out,) = run_ranks(one_step_of, 1, str(tmp_path), "simclr_synth", *SGD, *SIMCLR["directclr"])
    assert not any(name.startswith("projector") for name in out["params"])


@pytest.mark.parametrize("recipe, overrides, message", [
    ("moco_v2_synth", ["method.loss=dcl"], "unknown config key 'method.loss'"),
    ("simclr_synth", ["method.hard_negatives=true"], "unknown config key 'method.hard_negatives'"),
    ("simclr_synth", ["method.loss=infonce2"], "method.loss='infonce2' is not one of"),
    ("simclr_synth", ["method.loss=fnc"], "method.loss=fnc takes 10 crops per image, the counts of data.views give 2"),
    ("simclr_synth", ["method.fnc_mode=both"], "method.fnc_mode='both' must be attraction or elimination"),
    ("pcl_synth", ["method.hard_negatives=true"], "method.hard_negatives applies to moco_v2's InfoNCE"),
    ("moco_v2_synth", ["method.hard_negatives=true", "method.hard_num=4096"], "method.hard_num=4096 must be"),
    ("supcon_synth", ["method.views=3"], "supcon takes method.views=3 crops per image, the counts of data.views give 2"),
])
def test_options_that_do_not_fit_are_refused_at_load(tmp_path: Path, recipe: str, overrides: list[str],
                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, *overrides, recipe=recipe)


def test_cli_refuses_before_any_rank_starts(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sslforge.cli", "train", "moco_v2_synth", "method.loss=dcl",
                             f"run_dir={tmp_path / 'run'}", "--nproc", "2"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "unknown config key 'method.loss'" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_supcon_refuses_an_unlabelled_sample_naming_its_shard(tmp_path: Path) -> None:
    samples = [{"__key__": f"s{i:03d}", "png": png_bytes(i), **({"cls": 1} if i != 5 else {})} for i in range(8)]
    (shard,) = write_shards(samples, str(tmp_path), prefix="nolabel")
    loader = ShardLoader([shard], 4, _two_views(), num_workers=0, require_labels=True)
    loader.set_epoch(0)
    with pytest.raises(DataError, match=rf"sample s005 of shard {shard} has no label"):
        list(loader)
    unsupervised = ShardLoader([shard], 4, _two_views(), num_workers=0)
    unsupervised.set_epoch(0)
    assert sorted(int(x) for b in unsupervised for x in b["label"]) == [-1] + [1] * 7


def _two_views():  # type: ignore[no-untyped-def]
    from sslforge.data_pipeline.views import build_view_transform

    return build_view_transform(small_views())


# ------------------------------------------------------------------ compare


@pytest.mark.slow
def test_compare_trains_variants_on_one_budget_and_writes_its_table(tmp_path: Path, synth_data: dict) -> None:
    out = tmp_path / "cmp"
    shared = ["--set", f"data.train={synth_data['train']}", "--set", f"data.val={synth_data['val']}",
              "--set", "train.steps=2", "--set", "logging.progress=false", "--set", "eval.every_epochs=0",
              "--set", "eval.at_end=true"]
    result = subprocess.run([sys.executable, "-m", "sslforge.cli", "compare", "simclr_synth",
                             "dcl=simclr_synth:method.loss=dcl", "--out", str(out), "--nproc", "1", *shared],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in rows] == ["simclr_synth", "dcl"]
    for row in rows:  # each run's own final kNN, as its metrics logged it
        records = [json.loads(x) for x in (out / row["label"] / "metrics.jsonl").read_text().splitlines()]
        assert row["evaluation"] == "knn_top1"
        assert row["top1"] == [r["knn_top1"] for r in records if "knn_top1" in r][-1]
        assert row["minutes"] > 0
    table = (out / "compare.md").read_text()
    assert "| dcl |" in table and "| kNN |" in table and "2 steps of batch 128" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_an_unfair_comparison_before_training(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sslforge.cli", "compare", "simclr_synth",
                             "b=simclr_synth:train.seed=1", "--out", str(tmp_path / "cmp")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "variants differ in train.seed" in result.stderr
    assert not any((tmp_path / "cmp").glob("*/metrics.jsonl"))
