"""Shard specs, sample counting and writing."""
from __future__ import annotations

import json
import os
import tarfile

import pytest
from PIL import Image

from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.shards import (expand_shards, imagefolder_to_shards, shard_sizes,
                                           write_shards)
from tests.data_helpers import png_bytes, write_uneven


def test_write_shards_splits_and_records_sizes(tmp_path):
    samples = ({"__key__": f"k{i:03d}", "png": png_bytes(i), "cls": i, "txt": "a cat",
                "json": {"i": i}} for i in range(25))
    paths = write_shards(samples, str(tmp_path), prefix="train", max_per_shard=10)
    assert [os.path.basename(p) for p in paths] == [f"train-{i:06d}.tar" for i in range(3)]
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 5}
    with tarfile.open(paths[0]) as tar:
        assert {"k000.png", "k000.cls", "k000.txt", "k000.json"} <= set(tar.getnames())
        assert tar.extractfile("k003.cls").read() == b"3"


def test_shard_sizes_from_sizes_json_and_from_headers(tmp_path):
    paths = write_uneven(tmp_path, [7, 1, 13, 3])
    assert shard_sizes(paths) == [7, 1, 13, 3]
    (tmp_path / "sizes.json").write_text(json.dumps({"p0-000000.tar": 99}))  # trusted when listed
    assert shard_sizes(paths) == [99, 1, 13, 3]
    os.remove(tmp_path / "sizes.json")
    assert shard_sizes(paths) == [7, 1, 13, 3]


def test_expand_brace_pattern_directory_and_joined_specs(tmp_path):
    paths = write_shards(({"__key__": f"{i}", "png": png_bytes(i)} for i in range(30)),
                         str(tmp_path / "a"), max_per_shard=10)
    other = write_uneven(tmp_path / "b", [2])
    assert expand_shards(str(tmp_path / "a" / "shard-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path / "a")) == paths
    assert expand_shards(f"{tmp_path / 'a'}::{other[0]}") == paths + other


@pytest.mark.parametrize("spec", ["missing-dir", "shard-{000000..000005}.tar", "empty"])
def test_expand_missing_raises_naming_the_path(tmp_path, spec):
    write_shards(({"__key__": f"{i}", "png": png_bytes(i)} for i in range(3)), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        expand_shards(str(tmp_path / spec))
    expected = "shard-000001.tar" if "{" in spec else spec
    assert expected in str(err.value)


def test_shard_sizes_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.tar"):
        shard_sizes([str(tmp_path / "nope.tar")])


def test_imagefolder_to_shards(tmp_path):
    src = tmp_path / "src"
    for label, cls in enumerate(["cat", "dog"]):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (label * 200, i, 0)).save(src / cls / f"{i}.jpeg")
    (src / "dog" / "notes.txt").write_text("not an image")
    paths = imagefolder_to_shards(str(src), str(tmp_path / "out"), max_per_shard=4)
    assert shard_sizes(paths) == [4, 2]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"cat": 0, "dog": 1}
    seen = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert all(set(s) == {"jpg", "cls", "json"} for s in seen.values())
    for sample in seen.values():
        meta = json.loads(sample["json"])
        assert sample["jpg"] == (src / meta["path"]).read_bytes()  # original bytes kept
        assert int(sample["cls"]) == {"cat": 0, "dog": 1}[meta["class"]]


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()])
def test_imagefolder_missing_or_empty(tmp_path, make):
    make(tmp_path / "src")
    with pytest.raises(DataError, match="src"):
        imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "out"), 10)


def test_write_shards_without_samples_raises(tmp_path):
    with pytest.raises(DataError, match="no samples"):
        write_shards(iter(()), str(tmp_path))
    assert list(tmp_path.iterdir()) == []
