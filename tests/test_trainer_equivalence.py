"""One full SimCLR training step: 2 gloo ranks with B/2 each == 1 rank with B.

Covers the gathered negatives, the global batch norm, DeepSpeed's gradient averaging and the
LARS update: loss, every parameter gradient and every updated parameter must agree.
"""
from __future__ import annotations

import torch

from tests.dist_harness import run_ranks
from tests.trainer_fixtures import one_step

# LARS, as in the published recipe (Adam's first step is sign(g): it would amplify
# float rounding in near-zero gradients into parameter differences of size lr)
LARS = "optim.name=lars"


def test_one_step_two_ranks_equal_one_rank(tmp_path) -> None:
    (single,) = run_ranks(one_step, 1, str(tmp_path / "one"), LARS)
    pair = run_ranks(one_step, 2, str(tmp_path / "two"), LARS)
    assert single["finite"] and pair[0]["finite"]
    assert abs(pair[0]["loss"] - single["loss"]) < 1e-5
    assert pair[0]["loss"] == pair[1]["loss"]
    assert single["grads"].keys() == pair[0]["grads"].keys()
    for name, grad in single["grads"].items():
        assert torch.allclose(pair[0]["grads"][name], grad, atol=1e-5, rtol=0), name
        assert torch.equal(pair[0]["grads"][name], pair[1]["grads"][name]), name
        assert torch.allclose(pair[0]["params"][name], single["params"][name], atol=1e-5, rtol=0), name
    assert any(g.abs().sum() > 0 for g in single["grads"].values())
