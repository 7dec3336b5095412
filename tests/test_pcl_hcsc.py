"""PCL and HCSC in the trainer: with the clusters of the whole-dataset pass active, one step on 2
gloo ranks with B/2 each equals 1 rank with B (loss, its prototype part, gradients, parameters,
queue, clusters); the clusters are used only from `clustering_starts_epoch`; a run stopped inside
an epoch and resumed continues with that epoch's clusters, queue and key encoder, step for step.

The losses are checked against transcriptions of the official code in test_prototype_losses.py,
the k-means and concentrations against numpy in test_clustering.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sslforge import distributed
from sslforge.launcher.env import init_distributed
from sslforge.trainer.loop import Trainer
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import (FixedLoader, assert_resumed_losses_equal, assert_tensors_close,
                                    assert_two_ranks_equal_one, global_batch, local_slice, one_step_of,
                                    tiny_config)

# MoCo v2's test settings (SGD, SyncBN so that N ranks equal one by design, a queue of two global
# batches of 8), clustering from the first epoch into a few clusters of the 512 test images.
COMMON = ["method.queue_size=16", "optim.name=sgd", "optim.base_lr=1.0", "method.shuffle_bn=false",
          "model.sync_bn=true", "method.momentum=0.9", "method.clustering_starts_epoch=0",
          "eval.batch_size=64"]
PCL = ("pcl_synth", ["method.num_clusters=[6,12]", "method.negative_prototypes=3"])
HCSC = ("hcsc_synth", ["method.num_clusters=[12,6,3]"])
ATOL = 1e-5


@pytest.mark.parametrize("recipe, own", [PCL, HCSC], ids=["pcl", "hcsc"])
def test_one_step_with_clusters_two_ranks_equal_one_rank(tmp_path: Path, synth_data: dict, recipe: str,
                                                         own: list[str]) -> None:
    overrides = [*COMMON, *own, f"data.train={synth_data['train']}"]
    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), recipe, *overrides)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), recipe, *overrides)
    assert_two_ranks_equal_one(single, pair, ATOL)
    assert single["metrics"]["loss_proto"] > 0  # the clusters took part
    assert pair[0]["metrics"]["loss_proto"] == pytest.approx(single["metrics"]["loss_proto"], abs=ATOL)
    clusters = single["extra_state"]["clusterings"]
    assert [len(c["centroids"]) for c in clusters] == [int(k) for k in own[0].split("=")[1].strip("[]").split(",")]
    for rank in pair:
        for got, expected in zip(rank["extra_state"]["clusterings"], clusters):
            assert torch.equal(got["assignments"], expected["assignments"])
            assert torch.allclose(got["centroids"], expected["centroids"], atol=ATOL)


def test_clusters_wait_for_their_epoch(tmp_path: Path, synth_data: dict) -> None:
    recipe, own = PCL
    overrides = [*COMMON, *own, f"data.train={synth_data['train']}", "method.clustering_starts_epoch=1"]
    (out,) = run_ranks(one_step_of, 1, str(tmp_path), recipe, *overrides)
    assert out["extra_state"] == {"clusterings": []}
    assert "loss_proto" not in out["metrics"]


# ------------------------------------------------------------------ resume

BATCH, STEPS_PER_EPOCH = 8, 3


def _train(run_dir: str, recipe: str, data: str, stop_at: int | None, *own: str) -> dict[str, Any]:
    """7 steps over epochs of 3 fixed batches: clusters made before steps 0, 3 and 6."""
    cfg = tiny_config(run_dir, *COMMON, *own, f"data.train={data}", f"optim.batch_size={BATCH}", "train.steps=7",
                      "train.log_every_steps=1", "train.ckpt_every_steps=100", f"method.queue_size={3 * BATCH}",
                      recipe=recipe)
    env = init_distributed("gloo")
    batches = [local_slice(global_batch(BATCH, seed=i), distributed.rank(), env.world_size)
               for i in range(STEPS_PER_EPOCH)]
    for i, batch in enumerate(batches):  # samples spread over the dataset, not only its first 8
        batch["index"] = batch["index"] * 50 + i
    trainer = Trainer(cfg, env, loader=FixedLoader(batches))
    step = trainer.fit(stop_at_step=stop_at).step
    return {"step": step, "extra_state": trainer.method.get_extra_state(),
            "params": {n: p.detach().clone() for n, p in trainer.method.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in trainer.method.named_buffers()}}


@pytest.mark.slow
def test_resume_inside_an_epoch_continues_with_its_clusters(tmp_path: Path, synth_data: dict) -> None:
    """PCL's run; HCSC keeps its clusters through the same `methods.clustered` code."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    recipe, own = PCL
    args = (recipe, synth_data["train"])
    expected = run_ranks(_train, 2, str(whole), *args, None, *own)
    assert [r["step"] for r in run_ranks(_train, 2, str(split), *args, 4, *own)] == [4, 4]  # inside epoch 1
    resumed = run_ranks(_train, 2, str(split), *args, None, *own)
    assert_resumed_losses_equal(whole, split, 7)
    for rank in (0, 1):
        assert_tensors_close(resumed[rank]["params"], expected[rank]["params"], f"rank {rank} parameter", ATOL)
        assert_tensors_close(resumed[rank]["buffers"], expected[rank]["buffers"], f"rank {rank} buffer", ATOL)
        for got, want in zip(resumed[rank]["extra_state"]["clusterings"], expected[rank]["extra_state"]["clusterings"]):
            assert torch.equal(got["assignments"], want["assignments"])
            assert torch.allclose(got["centroids"], want["centroids"], atol=ATOL)
