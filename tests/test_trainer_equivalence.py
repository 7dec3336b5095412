"""One full SimCLR training step: 2 gloo ranks with B/2 each == 1 rank with B.

Covers the gathered negatives, the global batch norm, DeepSpeed's gradient averaging and the
LARS update: loss, every parameter gradient and every updated parameter must agree.
"""
from __future__ import annotations

from tests.dist_harness import run_ranks
from tests.trainer_fixtures import assert_two_ranks_equal_one, one_step

# LARS, as in the published recipe (Adam's first step is sign(g): it would amplify
# float rounding in near-zero gradients into parameter differences of size lr)
LARS = "optim.name=lars"


def test_one_step_two_ranks_equal_one_rank(tmp_path) -> None:
    (single,) = run_ranks(one_step, 1, str(tmp_path / "one"), LARS)
    pair = run_ranks(one_step, 2, str(tmp_path / "two"), LARS)
    assert_two_ranks_equal_one(single, pair)
