"""The linear probe (`sslforge eval linear`, method `linear`): distributed like every method, the
fast path trains what the streaming path trains, its score is the plain argmax accuracy of its
head on the encoder's features, and the frozen encoder never moves."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sslforge.eval.features import extract_features
from sslforge.eval.linear import FeatureLoader, final_score
from sslforge.eval.run import load_method
from sslforge.launcher.env import DistEnv
from tests.dist_harness import run_ranks
from tests.test_cli import sslforge
from tests.trainer_fixtures import assert_two_ranks_equal_one, one_step_of

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
UNAUGMENTED = "data.views=[{count: 1, scale: [1.0, 1.0], flip_p: 0.0, jitter_p: 0.0, grayscale_p: 0.0, blur_p: 0.0}]"


def test_two_ranks_equal_one_with_feature_batch_norm(tmp_path: Path, pretrained_run: Path) -> None:
    """Loss, head gradients, parameters (the encoder's unchanged) and the global BN statistics."""
    args = ("eval/linear_synth", f"method.source={pretrained_run}", "method.feature_bn=true")
    single = run_ranks(one_step_of, 1, str(tmp_path / "one"), *args)[0]
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), *args)
    assert_two_ranks_equal_one(single, pair)
    assert set(single["grads"]) == {"model.head.1.weight", "model.head.1.bias"}
    assert all(not u.any() for name, u in single["update"].items() if name.startswith("model.backbone."))
    assert single["buffers"]["model.head.0.running_mean"].abs().sum() > 0


def test_cached_batches_split_over_ranks_are_the_single_rank_batches() -> None:
    features, labels = torch.randn(50, 4), torch.arange(50) % 7
    single = FeatureLoader(features, labels, 8, seed=3, rank=0, world_size=1)
    pair = [FeatureLoader(features, labels, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(pair[0]) == 50 // 8
    for epoch in (0, 1):
        for loader in (single, *pair):
            loader.set_epoch(epoch, skip_batches=1)
        for whole, a, b in zip(single, *pair):
            assert torch.equal(whole["index"], torch.cat([a["index"], b["index"]]))
            assert torch.equal(whole["views"][0], features[whole["index"]])
            assert torch.equal(whole["label"], labels[whole["index"]])
    single.set_epoch(0)
    first = [b["index"] for b in single]
    single.set_epoch(1)
    assert not all(torch.equal(x, y["index"]) for x, y in zip(first, single))  # a new permutation per epoch


def _probe(pretrained: Path, data: dict, out: Path, *overrides: str) -> Path:
    done = sslforge("eval", "linear", str(pretrained), "--train", data["train"], "--val", data["val"],
                    "--recipe", "eval/linear_synth", "--out", str(out), "logging.progress=false",
                    "optim.batch_size=512", "train.epochs=4", "eval.every_epochs=0", "eval.at_end=true", *overrides, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_cached_path_gives_the_streaming_accuracy(tmp_path: Path, pretrained_run: Path, synth_data: dict) -> None:
    """Full-batch steps on 512 images, the streaming crops being the whole image (what the cached
    path encodes): the same head and the same top-1, one scored from cached features, the other
    by streaming the val images through encoder and head."""
    cached = _probe(pretrained_run, synth_data, tmp_path / "cached", "method.cache_features=true")
    streamed = _probe(pretrained_run, synth_data, tmp_path / "streamed", "method.cache_features=false", UNAUGMENTED)
    heads = [load_method(run)[2].classifier().head for run in (cached, streamed)]
    assert torch.allclose(heads[0].weight, heads[1].weight, atol=1e-5)
    assert heads[0].weight.abs().sum() > 0
    assert final_score(cached)["val_top1"] == final_score(streamed)["val_top1"]


def test_the_score_is_the_heads_argmax_accuracy_and_lands_in_the_pretrained_run(linear_run: Path,
                                                                                 pretrained_run: Path,
                                                                                 shapes: dict) -> None:
    _, cfg, method, _ = load_method(linear_run)
    val = extract_features(method.encoder(), shapes["val"], cfg.data.image_size, 256, CPU, 0, normalize=False)
    with torch.no_grad():
        predicted = method.classifier().head.eval()(val.features).argmax(1)
    top1 = float((predicted == val.labels).float().mean() * 100)
    score = final_score(linear_run)
    assert abs(score["val_top1"] - top1) < 1e-3
    assert top1 > 50  # chance is 10%; measured about 85%
    records = [json.loads(line) for line in (pretrained_run / "metrics.jsonl").read_text().splitlines()]
    linear = [r for r in records if r.get("eval") == "linear" and r["linear_run"] == str(linear_run)]
    assert len(linear) == 1 and linear[0]["linear_top1"] == score["val_top1"]
    assert linear[0]["step"] == 200 and cfg.method.source.endswith("step_00000200")
    assert cfg.model == load_method(pretrained_run)[1].model  # the probe's config names its encoder


def test_bad_inputs_are_named(tmp_path: Path, pretrained_run: Path, synth_data: dict) -> None:
    missing = sslforge("eval", "linear", str(tmp_path / "nothing"), "--train", synth_data["train"],
                       "--val", synth_data["val"], "--recipe", "eval/linear_synth")
    assert missing.returncode == 2 and "no run directory" in missing.stderr
    few = sslforge("eval", "linear", str(pretrained_run), "--train", synth_data["train"], "--val", synth_data["val"],
                   "--recipe", "eval/linear_synth", "--out", str(tmp_path / "few"), "method.num_classes=5",
                   "logging.progress=false")
    assert few.returncode != 0 and "outside method.num_classes=5" in few.stderr
