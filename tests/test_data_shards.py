"""Shard specs, sample counting and writing; `sslforge data shards` (ImageFolder -> shards)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslforge.cli import _parser
from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.eval_stream import eval_batches
from sslforge.data_pipeline.imagefolder import imagefolder_to_shards
from sslforge.data_pipeline.shards import expand_shards, shard_sizes, write_shards
from tests.data_helpers import png_bytes, write_uneven
from tests.test_cli import sslforge


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


def test_write_shards_without_samples_raises(tmp_path):
    with pytest.raises(DataError, match="no samples"):
        write_shards(iter(()), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- sslforge data shards

def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (12, 10), seed: int = 0) -> Path:
    """An ImageFolder tree, `counts[class]` noise JPEGs (PNG every fifth) of `size` per class."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            if i % 5 == 4:
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
            else:
                (root / cls / f"{i}.jpg").write_bytes(_jpeg(rng, *size))
    return root


def _read(directory: Path) -> list[dict[str, bytes]]:
    """Every sample of the shards in `directory`, in shard order, as {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in expand_shards(str(directory)):
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_imagefolder_keeps_bytes_and_labels(tmp_path):
    src = _tree(tmp_path / "src", {"cat": 3, "dog": 3})
    (src / "dog" / "notes.txt").write_text("not an image")
    report = imagefolder_to_shards(str(src), str(tmp_path / "out"), max_per_shard=4, workers=1)
    (split,) = report.splits
    assert shard_sizes(split.shards) == [4, 2] and split.samples == 6 and report.ignored == 1
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"cat": 0, "dog": 1}
    for sample in _read(tmp_path / "out"):
        meta = json.loads(sample["json"])
        ext = "png" if meta["path"].endswith(".png") else "jpg"
        assert set(sample) == {ext, "cls", "json"}
        assert sample[ext] == (src / meta["path"]).read_bytes()  # original bytes kept
        assert int(sample["cls"]) == {"cat": 0, "dog": 1}[meta["class"]]


@pytest.mark.parametrize("make", [lambda p: None, lambda p: p.mkdir()])
def test_imagefolder_missing_or_empty(tmp_path, make):
    make(tmp_path / "src")
    with pytest.raises(DataError, match="src"):
        imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "out"), 10)


def test_bad_images_are_reported_skipped_and_the_rest_streams_with_labels(tmp_path):
    src = _tree(tmp_path / "src", {"ant": 4, "bee": 5, "cow": 3})
    whole = _jpeg(np.random.default_rng(1), 64, 48)
    (src / "bee" / "cut.jpg").write_bytes(whole[:len(whole) * 4 // 5])  # truncated: header intact, scan cut
    (src / "cow" / "fake.jpg").write_text("not an image at all")
    out = tmp_path / "out"
    result = sslforge("data", "shards", str(src), str(out), "--workers", "1", "--max-per-shard", "5")
    assert result.returncode == 0, result.stderr
    bad_lines = [line for line in result.stderr.splitlines() if line.startswith("sslforge: skipping")]
    assert len(bad_lines) == 2, result.stderr
    assert any("bee/cut.jpg" in line and "truncated" in line.lower() for line in bad_lines), bad_lines
    assert any("cow/fake.jpg" in line and "not an image" in line for line in bad_lines), bad_lines
    assert "skipped 2 unreadable image(s)" in result.stdout
    assert [line.split("\t")[0] for line in (out / "skipped.txt").read_text().splitlines()] == \
        ["bee/cut.jpg", "cow/fake.jpg"]
    # what the project's eval stream reads: every good image once, its pixels and its label
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"ant": 0, "bee": 1, "cow": 2}
    paths = [json.loads(s["json"])["path"] for s in _read(out)]
    assert sorted(paths) == sorted(str(p.relative_to(src)) for p in src.rglob("*.*")
                                   if p.name not in ("cut.jpg", "fake.jpg"))
    batches = list(eval_batches(expand_shards(str(out)), _pixels, batch_size=64))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert sum(b["skipped"] for b in batches) == 0 and len(labels) == len(paths)
    assert labels == [classes[p.split("/")[0]] for p in paths]
    for image, path in zip(images, paths):
        with Image.open(src / path) as reference:
            assert np.array_equal(image.numpy(), np.asarray(reference.convert("RGB")))


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def test_all_images_bad_is_an_error_leaving_nothing(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_text("text")
    (tmp_path / "src" / "a" / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images .* all 2 were skipped"):
        imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "out"), workers=1)
    assert not (tmp_path / "out").exists()
    # a failed --overwrite leaves the earlier shards as they were
    imagefolder_to_shards(str(_tree(tmp_path / "good", {"a": 3})), str(tmp_path / "out"), workers=1)
    before = _files(tmp_path / "out")
    with pytest.raises(DataError, match="no readable images"):
        imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "out"), workers=1, overwrite=True)
    assert _files(tmp_path / "out") == before and not (tmp_path / "out" / ".sslforge-partial").exists()


def test_non_empty_output_is_refused_and_overwrite_replaces_every_old_shard(tmp_path):
    src = _tree(tmp_path / "src", {"a": 7, "b": 6})
    out = tmp_path / "out"
    imagefolder_to_shards(str(src), str(out), max_per_shard=2, workers=1)
    written = _files(out)
    again = sslforge("data", "shards", str(src), str(out), "--workers", "1", "--max-per-shard", "5")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        (f"sslforge: error: output directory {out} is not empty: it holds shards of an earlier run "
         "(classes.json, shard-000000.tar, shard-000001.tar, ...); pass --overwrite to replace them")]
    assert _files(out) == written
    # rewritten with fewer, larger shards: exactly the 13 images, none of the old shards left
    replaced = sslforge("data", "shards", str(src), str(out), "--workers", "1", "--max-per-shard", "5", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    shards = expand_shards(str(out))
    assert [os.path.basename(p) for p in shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    os.remove(out / "sizes.json")
    assert shard_sizes(shards) == [5, 5, 3]  # from the tar headers
    assert sorted(json.loads(s["json"])["path"] for s in _read(out)) == sorted(
        str(p.relative_to(src)) for p in src.rglob("*.*"))


def test_overwrite_never_deletes_files_it_did_not_write(tmp_path):
    src = _tree(tmp_path / "src", {"a": 2})
    out = tmp_path / "out"
    imagefolder_to_shards(str(src), str(out), workers=1)
    (out / "notes.md").write_text("mine")
    with pytest.raises(DataError, match=f"{out} holds files `data shards` did not write .*notes.md"):
        imagefolder_to_shards(str(src), str(out), workers=1, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "shard-000000.tar").is_file()


def test_resize_shrinks_the_shorter_side_and_never_enlarges(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"wide.jpg": (40, 20), "tall.png": (20, 50), "small.jpg": (10, 12), "exact.jpg": (16, 30)}
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(src / "a" / name)
    imagefolder_to_shards(str(src), str(tmp_path / "out"), workers=1, resize=16, quality=80)
    got = {}
    for sample in _read(tmp_path / "out"):
        assert set(sample) == {"jpg", "cls", "json"}  # re-encoded as JPEG, the PNG too
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG"
            got[json.loads(sample["json"])["path"]] = image.size
    assert got == {"a/wide.jpg": (32, 16), "a/tall.png": (16, 40), "a/small.jpg": (10, 12), "a/exact.jpg": (16, 30)}


def test_val_fraction_splits_each_class_disjointly(tmp_path):
    src = _tree(tmp_path / "src", {"a": 10, "b": 20, "c": 5})
    out = tmp_path / "out"
    report = imagefolder_to_shards(str(src), str(out), max_per_shard=8, workers=1, val_fraction=0.2, seed=3)
    paths = {name: [json.loads(s["json"])["path"] for s in _read(out / name)] for name in ("train", "val")}
    per_class = {name: Counter(p.split("/")[0] for p in found) for name, found in paths.items()}
    assert per_class == {"train": {"a": 8, "b": 16, "c": 4}, "val": {"a": 2, "b": 4, "c": 1}}
    assert not set(paths["train"]) & set(paths["val"])
    assert sorted(paths["train"] + paths["val"]) == sorted(str(p.relative_to(src)) for p in src.rglob("*.*"))
    for name in ("train", "val"):
        assert json.loads((out / name / "classes.json").read_text()) == {"a": 0, "b": 1, "c": 2}
    patterns = {s.name: s.pattern for s in report.splits}
    assert patterns == {"train": f"{out}/train/train-{{000000..000003}}.tar", "val": f"{out}/val/val-000000.tar"}
    assert f"data.train={patterns['train']}" in report.summary().splitlines()
    assert expand_shards(patterns["train"]) == expand_shards(str(out / "train"))
    again = imagefolder_to_shards(str(src), str(tmp_path / "same"), max_per_shard=8, workers=1, val_fraction=0.2,
                                  seed=3)
    other = imagefolder_to_shards(str(src), str(tmp_path / "other"), max_per_shard=8, workers=1, val_fraction=0.2,
                                  seed=4)
    val_paths = {json.dumps(sorted(json.loads(s["json"])["path"] for s in _read(Path(r.out) / "val")))
                 for r in (report, again, other)}
    assert len(val_paths) == 2  # the same seed, the same split; another seed, another split


def test_any_number_of_workers_writes_the_same_shards(tmp_path):
    src = _tree(tmp_path / "src", {"a": 40, "b": 30}, size=(24, 18))
    (src / "a" / "bad.jpg").write_text("no")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        imagefolder_to_shards(str(src), str(out), max_per_shard=16, workers=workers, resize=12, val_fraction=0.1)
        outputs.append(_files(out))
    assert outputs[0] == outputs[1]
    assert "train/train-000003.tar" in outputs[0] and "skipped.txt" in outputs[0]


def test_every_argument_of_data_shards_has_help():
    shards = _subparser(_parser(), "data", "shards")
    assert shards.description or shards.format_help()
    missing = [a.dest for a in shards._actions if a.help is None]
    assert not missing, missing


def _subparser(parser, *names):
    for name in names:
        (sub,) = [a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)]
        parser = sub.choices[name]
    return parser
