"""Captions: tokenisers, captioned synthetic data, captions in batches, Localized Narratives shards."""
from __future__ import annotations

import colorsys
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslforge.cli import main as cli_main
from sslforge.data_pipeline import DataError
from sslforge.data_pipeline.captions import build_tokenizer
from sslforge.data_pipeline.eval_stream import eval_batches
from sslforge.data_pipeline.shards import expand_shards, write_shards
from sslforge.data_pipeline.stream import ShardLoader
from sslforge.data_pipeline.synth import CLASSES, write_synthetic
from tests.data_helpers import png_bytes, png_colour, raw_pixels


def _crc_ids(caption: str, vocab_size: int, length: int) -> list[int]:
    """The words tokenizer's ids, written out: start token 1, crc32 buckets, 0 padding."""
    words = re.findall(r"\w+", caption.lower())
    ids = [1] + [2 + zlib.crc32(w.encode("utf-8")) % (vocab_size - 2) for w in words]
    return ids[:length] + [0] * (length - len(ids))


CAPTIONS = ["A Red circle, at the TOP left", "", "star", "une étoile très jaune"]


def test_words_tokenizer_hashes_words_pads_truncates_and_masks() -> None:
    tok = build_tokenizer("words", 6)
    ids, mask = tok(CAPTIONS)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (4, 6)
    assert tok.pad_id == 0 and tok.vocab_size == 2 ** 15
    assert ids.tolist() == [_crc_ids(c, tok.vocab_size, 6) for c in CAPTIONS]
    assert mask.sum(1).tolist() == [6, 1, 2, 5]  # truncated to 6; start token alone; ...
    assert (ids[~mask] == 0).all() and (ids[mask] > 0).all()
    assert torch.equal(tok.encode(CAPTIONS[0])[0], ids[0])  # the per-sample path the workers use
    # the same ids in another process with another str hash seed (Python's hash() would differ)
    code = ("from sslforge.data_pipeline.captions import build_tokenizer; import json, sys; "
            "print(json.dumps(build_tokenizer('words', 6)(json.loads(sys.argv[1]))[0].tolist()))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(CAPTIONS)], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(other.stdout) == ids.tolist()


def test_pretrained_tokenizer_is_read_from_a_local_directory(tmp_path: Path) -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "at", "the", "top", "left"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    tok = build_tokenizer(str(tmp_path / "tok"), 8)
    captions = ["A red circles at the top left of it", "red", "zebra"]
    ids, mask = tok(captions)
    reference = BertTokenizer.from_pretrained(tmp_path / "tok")(captions, padding="max_length", truncation=True,
                                                                 max_length=8, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"].bool())
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 9, 10, 3]  # [CLS] a red circle ##s at the [SEP]: cut at 8
    assert tok.vocab_size == len(vocab) and tok.pad_id == 0


def test_tokenizer_directory_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'absent'} is not a directory"):
        build_tokenizer(str(tmp_path / "absent"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} holds no tokenizer files"):
        build_tokenizer(str(tmp_path / "empty"), 8)


# ----------------------------------------------------------------------------- synthetic captions

HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "purple": 300}  # sextant centres
SHAPES = {"pair of bars": "bar_pair", "l shape": "ell", **{c: c for c in CLASSES if c not in ("bar_pair", "ell")}}
CENTRE = np.linspace(-1, 1, 65)[1::2]  # the 32 pixel centres of [-1, 1]


def _measured(image: np.ndarray) -> dict:
    """Attributes recomputed from the pixels: the shape is the side of a brightness threshold
    the border is not on (the two colours share a hue at value 0.9 or 0.35)."""
    bright = image.max(-1) > 160
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    shape = ~bright if border.mean() > 0.5 else bright
    values, counts = np.unique(image[shape], axis=0, return_counts=True)
    hue = colorsys.rgb_to_hsv(*(values[counts.argmax()] / 255))[0] * 360  # dominant colour of the shape
    y, x = np.meshgrid(CENTRE, CENTRE, indexing="ij")
    return {"dark": border.mean() > 0.5, "hue": hue, "x": x[shape].mean(), "y": y[shape].mean(),
            "area": int(shape.sum())}


def _words_in(caption: str, names) -> list[str]:
    return [n for n in names if re.search(rf"\b{n}\b", caption.lower())]


def _check_position(caption: str, x: float, y: float, tol: float = 0.05) -> None:
    """The named cell of a 3x3 grid (edges at +-0.2) holds the centre of mass, +-tol for pixels."""
    named = []
    for coordinate, (low, high) in ((y, ("top", "bottom")), (x, ("left", "right"))):
        words = _words_in(caption, [low, high])
        if words == [low]:
            assert coordinate < -0.2 + tol, (caption, x, y)
        elif words == [high]:
            assert coordinate > 0.2 - tol, (caption, x, y)
        else:
            assert words == [] and abs(coordinate) < 0.2 + tol, (caption, x, y)
        named += words
    assert ("centre" in caption) == (not named), caption


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> dict:
    """300 captioned synthetic images read back through the evaluation stream with a tokenizer."""
    root = tmp_path_factory.mktemp("synth")
    paths = write_synthetic(str(root / "cap"), n_train=300, n_val=10, image_size=32, seed=5, captions=True)
    plain = write_synthetic(str(root / "plain"), n_train=300, n_val=10, image_size=32, seed=5)
    tok = build_tokenizer("words", 17)
    batches = list(eval_batches(expand_shards(paths["train"]), lambda im: torch.from_numpy(np.asarray(im).copy()),
                                128, tokenizer=tok))
    pixels = [b["image"] for b in eval_batches(expand_shards(plain["train"]), lambda im: torch.from_numpy(
        np.asarray(im).copy()), 128)]
    return {"tok": tok, "images": torch.cat([b["image"] for b in batches]).numpy(),
            "plain": torch.cat(pixels).numpy(), "labels": torch.cat([b["label"] for b in batches]).tolist(),
            "captions": [c for b in batches for c in b["caption"]], "ids": torch.cat([b["text_ids"] for b in batches]),
            "mask": torch.cat([b["text_mask"] for b in batches]), "dir": paths["train"]}


def test_synthetic_captions_describe_the_drawn_pixels(captioned: dict) -> None:
    areas: dict[tuple[str, str], list[int]] = defaultdict(list)
    for image, label, caption in zip(captioned["images"], captioned["labels"], captioned["captions"]):
        got = _measured(image)
        (colour,), (shade,) = _words_in(caption, HUES), _words_in(caption, ["dark", "light"])
        (size,), (shape,) = _words_in(caption, ["small", "medium", "large"]), _words_in(caption, SHAPES)
        assert SHAPES[shape] == CLASSES[label], caption
        assert (shade == "dark") == got["dark"], caption
        assert abs((got["hue"] - HUES[colour] + 180) % 360 - 180) <= 30 + 2, (caption, got)  # 2 deg: 8-bit rounding
        _check_position(caption, got["x"], got["y"])
        areas[(shape, size)].append(got["area"])
    for shape in SHAPES:  # per shape, every small one covers fewer pixels than every large one
        assert max(areas[(shape, "small")]) < min(areas[(shape, "large")]), shape
    assert len({re.sub(r"small|medium|large|dark|light|" + "|".join(HUES) + "|" + "|".join(SHAPES), "", c)
                for c in captioned["captions"]}) > 4  # several phrasings (and positions)


def test_synthetic_captions_leave_pixels_and_are_tokenised_per_sample(captioned: dict) -> None:
    assert np.array_equal(captioned["images"], captioned["plain"])  # --captions draws the same images
    tok = captioned["tok"]
    assert captioned["ids"].tolist() == [_crc_ids(c, tok.vocab_size, 17) for c in captioned["captions"]]
    assert torch.equal(captioned["mask"], captioned["ids"] > 0)
    words = {w for c in captioned["captions"] for w in re.findall(r"\w+", c.lower())}
    assert len({2 + zlib.crc32(w.encode()) % (tok.vocab_size - 2) for w in words}) == len(words)  # no collision
    with tarfile.open(expand_shards(captioned["dir"])[0]) as tar:
        first = tar.extractfile("00000000.txt").read().decode()
    assert first == captioned["captions"][0]


# ----------------------------------------------------------------------------- captions in batches

def _caption(i: int) -> str:
    return f"caption {i}"


def _write_captioned(directory: Path, n: int, corrupt: frozenset[int] = frozenset(),
                     uncaptioned: frozenset[int] = frozenset()) -> list[str]:
    """Sample i: flat colour png_colour(i), caption 'caption i' in .txt (even i) or in a
    Localized Narratives style .json (odd i); garbage image bytes when corrupt."""
    samples = []
    for i in range(n):
        sample = {"__key__": f"s{i:05d}", "cls": i % 5}
        sample.update({"jpg": b"not an image"} if i in corrupt else {"png": png_bytes(i)})
        if i not in uncaptioned:
            sample.update({"txt": _caption(i)} if i % 2 == 0 else {"json": {"caption": _caption(i), "image_id": "x"}})
        samples.append(sample)
    return write_shards(samples, str(directory), prefix="c", max_per_shard=7)


def _assert_aligned(batch: dict, tok) -> None:
    (pixels,) = batch["views"]
    assert len(batch["caption"]) == batch["text_ids"].shape[0] == batch["text_mask"].shape[0] == pixels.shape[0]
    for image, index, caption in zip(pixels, batch["index"].tolist(), batch["caption"]):
        assert tuple(image[:, 0, 0].tolist()) == png_colour(index) and caption == _caption(index)
    ids, mask = tok(batch["caption"])
    assert torch.equal(batch["text_ids"], ids) and torch.equal(batch["text_mask"], mask)


def test_loader_keeps_each_caption_with_its_image(tmp_path: Path) -> None:
    tok = build_tokenizer("words", 4)
    shards = _write_captioned(tmp_path, 20, corrupt=frozenset({3, 4, 11}))
    kw = dict(batch_size=3, transform=raw_pixels, shuffle_buffer=4, num_workers=0, tokenizer=tok)
    epoch = []
    for rank in range(2):
        loader = ShardLoader(shards, rank=rank, world_size=2, **kw)
        loader.set_epoch(1)
        batches = list(loader)
        loader.set_epoch(1, skip_batches=2)  # resumed mid-epoch: the same rest, captions included
        for full, resumed in zip(batches[2:], loader, strict=True):
            assert resumed["caption"] == full["caption"] and torch.equal(resumed["text_ids"], full["text_ids"])
        epoch += batches
    for batch in epoch:
        _assert_aligned(batch, tok)  # corrupt images are replaced together with their captions
    seen = {i for b in epoch for i in b["index"].tolist()}
    assert seen == set(range(20)) - {3, 4, 11} and sum(b["skipped"] for b in epoch) >= 3
    plain = next(iter(ShardLoader(shards, 3, raw_pixels, num_workers=0)))
    assert set(plain) == {"views", "label", "index", "skipped"}  # without a tokenizer: as before


def test_a_sample_without_caption_stops_naming_shard_and_key(tmp_path: Path) -> None:
    tok = build_tokenizer("words", 4)
    shards = _write_captioned(tmp_path, 10, uncaptioned=frozenset({8}))
    second = re.escape(shards[1])  # s00008 is in the second shard of 7
    with pytest.raises(DataError, match=f"sample s00008 of shard {second} has no caption"):
        list(ShardLoader(shards, 5, raw_pixels, num_workers=0, tokenizer=tok))
    with pytest.raises(DataError, match=f"sample s00008 of shard {second} has no caption"):
        list(eval_batches(shards, lambda im: raw_pixels(im)[0], 5, tokenizer=tok))
    assert len(list(ShardLoader(shards, 5, raw_pixels, num_workers=0))) == 2  # captions not asked for: fine


# ----------------------------------------------------------------------------- Localized Narratives

def _narrative(image_id: str, annotator: int, caption: str) -> dict:
    """A record in the published layout (google/localized-narratives, localized_narratives.py)."""
    return {"dataset_id": "open_images", "image_id": image_id, "annotator_id": annotator, "caption": caption,
            "timed_caption": [{"utterance": caption, "start_time": 0.0, "end_time": 1.5}],
            "traces": [[{"x": 0.1, "y": 0.2, "t": 0.0}] * 50], "voice_recording": f"open_images/{image_id}.ogg"}


def _jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in expand_shards(str(shard_dir)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def test_narratives_become_captioned_shards(tmp_path: Path, capsys, caplog) -> None:
    images = tmp_path / "images"
    images.mkdir()
    jpegs = {"aa01": _jpeg(24, 16, (200, 10, 10)), "bb02": _jpeg(16, 16, (10, 200, 10))}
    for image_id, data in jpegs.items():
        (images / f"{image_id}.jpg").write_bytes(data)
    records = [_narrative("aa01", 1, "In this image there is a red wall."), _narrative("cc03", 2, "A missing one."),
               _narrative("bb02", 3, "A green field."), _narrative("aa01", 4, "A red painted surface.")]
    (tmp_path / "ln.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert cli_main(["data", "narratives", str(tmp_path / "ln.jsonl"), str(images), str(tmp_path / "out"),
                     "--max-per-shard", "2"]) == 0
    assert "wrote 3 narrative(s) in 2 shard(s)" in capsys.readouterr().out
    assert str(images / "cc03.jpg") in caplog.text
    samples = _members(tmp_path / "out")
    kept = [r for r in records if r["image_id"] != "cc03"]
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    for (key, sample), record in zip(sorted(samples.items()), kept):
        assert sample["txt"].decode() == record["caption"] and sample["jpg"] == jpegs[record["image_id"]]
        bulkless = {k: v for k, v in record.items() if k not in ("traces", "timed_caption")}
        assert json.loads(sample["json"]) == bulkless  # caption, image_id, annotator_id, dataset_id, voice_recording
    # resized on the way, and read back by the loader as captioned samples (.txt)
    assert cli_main(["data", "narratives", str(tmp_path / "ln.jsonl"), str(images), str(tmp_path / "small"),
                     "--image-size", "8"]) == 0
    batch = next(eval_batches(expand_shards(str(tmp_path / "small")), lambda im: torch.tensor(im.size), 8,
                              tokenizer=build_tokenizer("words", 8)))
    assert batch["image"].tolist() == [[12, 8], [8, 8], [12, 8]] and batch["caption"] == [r["caption"] for r in kept]


def test_a_malformed_narrative_line_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "ln.jsonl").write_text(json.dumps(_narrative("aa01", 1, "fine")) + "\n\n{not json\n")
    assert cli_main(["data", "narratives", str(tmp_path / "ln.jsonl"), str(tmp_path / "images"),
                     str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'ln.jsonl'}, line 3: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written
