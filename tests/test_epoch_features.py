"""The trainer's whole-dataset pass before an epoch: every training sample's feature, once each,
in sample-index order, on every rank; and its place in the loop (each epoch's start, never again
when a run resumes inside the epoch)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from sslforge import distributed
from sslforge.eval.features import extract_features
from sslforge.launcher.env import DistEnv, init_distributed
from sslforge.trainer.loop import Trainer
from tests.data_helpers import write_uneven
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import FixedLoader, global_batch, local_slice, tiny_config

SIZES, CORRUPT = [7, 6, 8], frozenset({9})  # 21 samples, 20 readable: 2 ranks split them unevenly


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def _extract(shards: str, batch_size: int) -> dict:
    """Rank 1's batch-norm statistics differ from rank 0's (per-rank BN): the pass must use rank
    0's on every rank, without changing rank 1's own."""
    env = init_distributed("gloo")
    encoder = _encoder().train()
    encoder[1].running_mean += env.rank
    own = encoder[1].running_mean.clone()
    got = extract_features(encoder, shards, 16, batch_size, env, num_workers=0)
    return {"features": got.features, "index": got.index, "labels": got.labels,
            "still_training": encoder.training, "own_stats_kept": torch.equal(encoder[1].running_mean, own)}


def test_every_sample_once_in_index_order_on_uneven_ranks(tmp_path: Path) -> None:
    write_uneven(tmp_path, SIZES, CORRUPT)
    shards = str(tmp_path)
    single = run_ranks(_extract, 1, shards, 4)[0]
    pair = run_ranks(_extract, 2, shards, 3)
    expected_index = torch.tensor([i for i in range(sum(SIZES)) if i not in CORRUPT])
    assert torch.equal(single["index"], expected_index)
    assert torch.equal(single["labels"], expected_index % 5)
    assert single["still_training"]  # eval mode only for the pass
    reference = nn.functional.normalize(_independent_features(tmp_path, expected_index), dim=1)
    assert torch.allclose(single["features"], reference, atol=1e-6)
    for rank in pair:
        assert rank["own_stats_kept"]
        assert torch.equal(rank["index"], expected_index)
        assert torch.allclose(rank["features"], single["features"], atol=1e-6)


def _independent_features(directory: Path, index: torch.Tensor) -> torch.Tensor:
    """The encoder in eval mode on each sample's image, decoded here one by one."""
    from PIL import Image

    from sslforge.data_pipeline.views import build_eval_transform
    from tests.data_helpers import png_colour

    transform, encoder = build_eval_transform(16), _encoder().eval()
    images = [transform(Image.new("RGB", (16, 16), png_colour(int(i)))) for i in index]
    with torch.no_grad():
        return encoder(torch.stack(images))


# ---------------------------------------------------------------- in the loop

BATCH, STEPS_PER_EPOCH = 8, 2


def _train(run_dir: str, shards: str, stop_at: int | None) -> list[dict]:
    """SimCLR asking for its encoder's features every epoch; returns what each call received."""
    cfg = tiny_config(run_dir, f"optim.batch_size={BATCH}", "train.epochs=2", f"data.train={shards}",
                      "train.log_every_steps=1", "eval.batch_size=4")
    env: DistEnv = init_distributed("gloo")
    batches = [local_slice(global_batch(BATCH, seed=i), distributed.rank(), env.world_size)
               for i in range(STEPS_PER_EPOCH)]
    trainer = Trainer(cfg, env, loader=FixedLoader(batches))
    calls: list[dict] = []
    method = trainer.method
    method.epoch_features_encoder = lambda epoch: method.encoder()

    def on_epoch_start(epoch: int, features):  # type: ignore[no-untyped-def]
        calls.append({"epoch": epoch, "step": trainer.pos.step, "index": features.index.tolist()})
        return {"clusters_made": 1.0}

    method.on_epoch_start = on_epoch_start
    trainer.fit(stop_at_step=stop_at)
    return calls


def test_loop_extracts_at_each_epoch_start_and_not_on_a_resume_inside_it(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    write_uneven(tmp_path / "shards", SIZES, CORRUPT)
    shards, run_dir = str(tmp_path / "shards"), tmp_path / "run"
    first = run_ranks(_train, 2, str(run_dir), shards, 3)  # stops inside epoch 1
    readable = [i for i in range(sum(SIZES)) if i not in CORRUPT]
    for calls in first:
        assert [(c["epoch"], c["step"]) for c in calls] == [(0, 0), (1, 2)]
        assert all(c["index"] == readable for c in calls)
    resumed = run_ranks(_train, 2, str(run_dir), shards, None)
    assert resumed == [[], []]  # epoch 1's state came back with the checkpoint
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    passes = [r for r in records if "epoch_features_s" in r]
    assert [(r["epoch"], r["clusters_made"]) for r in passes] == [(0, 1.0), (1, 1.0)]
