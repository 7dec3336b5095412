"""ShardLoader and eval_batches over uneven shards and 2 simulated ranks."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest
import torch

from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.eval_stream import eval_batches
from sslforge.data_pipeline import stream
from sslforge.data_pipeline.stream import ShardLoader
from sslforge.data_pipeline.views import build_view_transform
from tests.data_helpers import png_colour, raw_pixels, small_views, write_uneven

SIZES = [7, 1, 13, 3]  # 24 samples, fewer shards than the 6 slots of 2 ranks x 3 workers
N = sum(SIZES)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_uneven(tmp_path_factory.mktemp("uneven"), SIZES)


def _epoch(shards, epoch=0, skip=0, world_size=2, **kw) -> list[list[dict]]:
    """All batches of every rank for one epoch."""
    out = []
    for rank in range(world_size):
        loader = ShardLoader(shards, rank=rank, world_size=world_size, **kw)
        loader.set_epoch(epoch, skip_batches=skip)
        out.append(list(loader))
    return out


def _assert_consistent(batch: dict, batch_size: int) -> None:
    """Full batch; each image, label and index belong to the same sample."""
    (pixels,) = batch["views"]
    assert pixels.shape[0] == batch["label"].shape[0] == batch["index"].shape[0] == batch_size
    for image, label, index in zip(pixels, batch["label"].tolist(), batch["index"].tolist()):
        assert tuple(image[:, 0, 0].tolist()) == png_colour(index)
        assert label == index % 5


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
@pytest.mark.parametrize("workers, one_rank_batches", [(0, 5), (3, 6)])
def test_finite_epoch_covers_every_sample_with_equal_batches(shards, workers, one_rank_batches):
    kw = dict(batch_size=5, transform=raw_pixels, num_workers=workers, shuffle_buffer=4)
    loader = ShardLoader(shards, **kw)
    ranks = _epoch(shards, **kw)
    per_rank = ShardLoader(shards, world_size=2, **kw)
    assert [len(batches) for batches in ranks] == [len(per_rank)] * 2
    # 2 slots x 15 or 6 slots x 5: 30 samples, 6 of them repeats
    assert per_rank.repeats_per_epoch == 6 and len(per_rank) * 2 * 5 == N + 6
    counts = Counter(i for batches in ranks for b in batches for i in b["index"].tolist())
    assert set(counts) == set(range(N))
    assert sum(counts.values()) - N == per_rank.repeats_per_epoch
    for batches in ranks:
        for batch in batches:
            _assert_consistent(batch, 5)
            assert batch["skipped"] == 0
    order = [b["index"].tolist() for b in ranks[0]]
    assert order != [b["index"].tolist() for b in _epoch(shards, epoch=1, **kw)[0]]
    assert order == [b["index"].tolist() for b in _epoch(shards, **kw)[0]]  # deterministic
    assert len(loader) == one_rank_batches  # one rank: 24 samples, 1 or 3 slots of whole batches


def test_resampled_gives_the_advertised_batch_count(shards):
    kw = dict(batch_size=4, transform=raw_pixels, num_workers=2, mode="resampled",
              samples_per_epoch=50, seed=1)
    ranks = _epoch(shards, **kw)
    # ceil(50 / (4 slots * 4)) = 4 batches per slot, 2 workers per rank
    assert [len(b) for b in ranks] == [8, 8] == [len(ShardLoader(shards, world_size=2, **kw))] * 2
    for batches in ranks:
        for batch in batches:
            _assert_consistent(batch, 4)
    indices = [b["index"].tolist() for rank in ranks for b in rank]
    assert indices != [b["index"].tolist() for rank in _epoch(shards, epoch=1, **kw) for b in rank]


@pytest.mark.parametrize("mode, batches", [("finite", 4), ("resampled", 8)])
def test_resume_yields_the_tail_of_the_epoch(shards, mode, batches):
    transform = build_view_transform(small_views(count=2, size=8, solarize_p=0.3))
    loader = ShardLoader(shards, 3, transform, mode=mode, samples_per_epoch=40, num_workers=2,
                         shuffle_buffer=6, seed=5, rank=1, world_size=2)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == batches
    for skip in (1, 2, 3, batches):
        loader.set_epoch(2, skip_batches=skip)
        tail = list(loader)
        assert len(tail) == len(full) - skip
        for resumed, original in zip(tail, full[skip:]):
            assert torch.equal(resumed["index"], original["index"])
            assert all(torch.equal(a, b) for a, b in zip(resumed["views"], original["views"]))


def test_corrupt_sample_is_replaced_counted_and_logged(tmp_path, caplog):
    shards = write_uneven(tmp_path, SIZES, corrupt=frozenset({3, 10}))
    with caplog.at_level(logging.WARNING, logger="sslforge.data"):
        ranks = _epoch(shards, batch_size=4, transform=raw_pixels, num_workers=0)
    batches = [b for rank in ranks for b in rank]
    assert [len(r) for r in ranks] == [3, 3]  # 24 samples, 2 slots of 12: no padding
    assert sum(b["skipped"] for b in batches) == 2
    seen = Counter(i for b in batches for i in b["index"].tolist())
    assert set(seen) == set(range(N)) - {3, 10} and sum(seen.values()) == N
    for batch in batches:
        _assert_consistent(batch, 4)
    messages = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(messages) == 2
    assert any("s00003" in m and "p0-000000.tar" in m for m in messages)
    assert any("s00010" in m and "p2-000000.tar" in m for m in messages)


def test_resume_with_corrupt_samples_is_identical(tmp_path):
    shards = write_uneven(tmp_path, SIZES, corrupt=frozenset(range(0, N, 4)))
    loader = ShardLoader(shards, 3, build_view_transform(small_views()), num_workers=2,
                         shuffle_buffer=5, rank=0, world_size=2)
    full = list(loader)
    assert sum(b["skipped"] for b in full) > 0
    loader.set_epoch(0, skip_batches=3)
    for resumed, original in zip(list(loader), full[3:], strict=True):
        assert torch.equal(resumed["index"], original["index"])
        assert resumed["skipped"] == original["skipped"]
        assert all(torch.equal(a, b) for a, b in zip(resumed["views"], original["views"]))


def test_iterating_in_process_leaves_the_global_rng_alone(shards):
    loader = ShardLoader(shards, 4, build_view_transform(small_views()), num_workers=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(loader)
    assert torch.equal(torch.rand(3), expected)


def test_missing_shard_raises_at_construction(shards, tmp_path):
    missing = str(tmp_path / "gone-000001.tar")
    with pytest.raises(DataError, match="gone-000001.tar"):
        ShardLoader([*shards, missing], 4, raw_pixels)
    with pytest.raises(DataError, match="gone-000001.tar"):
        eval_batches([missing], raw_pixels, 4, 0, 1, 0)


def _eval_pixels(image):
    return raw_pixels(image)[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_sees_every_sample_exactly_once(shards, workers):
    batches = [b for rank in range(2) for b in eval_batches(shards, _eval_pixels, 4, rank, 2, workers)]
    indices = [i for b in batches for i in b["index"].tolist()]
    assert sorted(indices) == list(range(N))
    for batch in batches:
        for image, label, index in zip(batch["image"], batch["label"], batch["index"].tolist()):
            assert tuple(image[:, 0, 0].tolist()) == png_colour(index) and label == index % 5


def test_eval_skips_corrupt_samples_without_duplicates(tmp_path):
    shards = write_uneven(tmp_path, SIZES, corrupt=frozenset({0, 23}))
    batches = [b for rank in range(2) for b in eval_batches(shards, _eval_pixels, 4, rank, 2, 0)]
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(1, 23))
    assert sum(b["skipped"] for b in batches) == 2


# A lock another thread of the training process holds (gloo's, the rendezvous store's, a queue
# feeder's) while data workers start. Forked from that process, a worker inherited it held, with
# no thread left to release it: a rank waited forever at its final evaluation (CI, pcl_synth).
HELD_ELSEWHERE = threading.Lock()


def _needs_the_lock(image):
    if not HELD_ELSEWHERE.acquire(timeout=5):
        raise RuntimeError("the data worker inherited a lock its process's other thread held")
    HELD_ELSEWHERE.release()
    return raw_pixels(image)


def test_data_workers_inherit_no_lock_the_training_process_holds(shards):
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with HELD_ELSEWHERE:
            holding.set()
            done.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    holding.wait()
    try:
        batches = list(ShardLoader(shards, batch_size=4, transform=_needs_the_lock, num_workers=1))
    finally:
        done.set()
        thread.join()
    assert sum(b["index"].numel() for b in batches) >= N


def _stuck(image):
    time.sleep(20)
    return raw_pixels(image)


def test_a_stuck_data_worker_is_an_error_not_a_hang(shards, monkeypatch):
    monkeypatch.setattr(stream, "WORKER_TIMEOUT_S", 2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        list(ShardLoader(shards, batch_size=4, transform=_stuck, num_workers=1))
    assert time.monotonic() - start < 30
