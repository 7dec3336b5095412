"""Every method's CPU preset trains end to end through the CLI on 2 local ranks: a few steps,
a checkpoint, a final evaluation (kNN of the encoder; top-1 of a supervised method's
classifier), finite losses throughout.
(How well each one learns is measured in the README's table, with longer runs.)"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sslforge.config import list_recipes, load_config
from sslforge.methods import Method, method_class
from tests.test_cli import sslforge

# SimCLR: test_learning; the linear probe (`eval/linear_synth`, on a pretrained run): test_linear_probe
SYNTH_PRESETS = [r for r in list_recipes() if r.endswith("_synth") and r != "simclr_synth" and not r.startswith("eval/")]
# STL's two stages run end to end, stage 2 on stage 1's run, in tests/test_stl.py.
SMOKED_HERE = [r for r in SYNTH_PRESETS if not r.startswith("stl_")]
# Methods with their own evaluation: the score each logs (XMC-GAN scores only with an Inception
# file or a scorer run; without them it writes its sample grid).
OWN_EVALUATION = {"vae_synth": "val_elbo", "dual_encoder_synth": "val_r_precision", "xmcgan_synth": None}
WRITES_GRIDS = {"vae_synth", "xmcgan_synth"}
# The clustering methods cluster from the first epoch, so the CLI run goes through the whole-dataset pass.
OWN = {"pcl_synth": ["method.clustering_starts_epoch=0"], "hcsc_synth": ["method.clustering_starts_epoch=0"]}


def test_every_method_has_a_cpu_preset() -> None:
    from sslforge.methods import METHODS

    assert {p.removesuffix("_synth") for p in SYNTH_PRESETS} == set(METHODS) - {"simclr", "linear"}
    assert "eval/linear_synth" in list_recipes()


@pytest.mark.parametrize("preset", SMOKED_HERE)
@pytest.mark.slow
def test_preset_trains_two_ranks_end_to_end(preset: str, synth_data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = sslforge("train", preset, f"data.train={synth_data['train']}", f"data.val={synth_data['val']}",
                      f"run_dir={run_dir}", "train.steps=3", "train.log_every_steps=1", "eval.every_epochs=0", "eval.at_end=true",
                      "logging.progress=false", *OWN.get(preset, []), "--nproc", "2", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    cls = method_class(load_config(preset, ["data.train=x"]).method.name)
    if cls.evaluate is not Method.evaluate:  # a method's own evaluation: its score, its image grids
        if OWN_EVALUATION[preset]:
            assert [r[OWN_EVALUATION[preset]] for r in records if OWN_EVALUATION[preset] in r]
        if preset in WRITES_GRIDS:
            assert list((run_dir / "images").glob("*.png"))
    else:
        evaluation = "val_top1" if cls.classifier is not Method.classifier else "knn_top1"  # a supervised method's
        assert [r[evaluation] for r in records if evaluation in r]
    assert (run_dir / "checkpoints" / "latest").is_file()
    if preset in OWN:
        assert [r["clustering_s"] for r in records if "clustering_s" in r]
