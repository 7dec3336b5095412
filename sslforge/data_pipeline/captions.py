"""Captions: reading them from shards, tokenising them, and Localized Narratives to shards.

A sample's caption is `KEY.txt` (utf-8), else the `caption` field of `KEY.json` (the layout of
Localized Narratives records, Pont-Tuset et al. 2020). Tokenisers turn a caption into a fixed
`max_tokens` row of ids with a mask of the valid positions (valid tokens first, padding after):

- "words": built in, no vocabulary file. Lower-cased words (`\\w+` runs), a start token first,
  each word hashed to a stable id `2 + crc32(utf-8 word) % (vocab_size - 2)` (0 is padding, 1 the
  start token). crc32 is the same in every process and Python version (Python's `hash` of a str
  is salted per process). Two different words may share an id: each pair does with probability
  1/(vocab_size - 2), about one colliding pair per 256 distinct words at the default 2**15 (none
  among the built-in synthetic captions' words; a test checks it). For a large natural vocabulary
  (COCO, Open Images) use a pretrained tokenizer instead.
- anything else: a local Hugging Face tokenizer directory (`save_pretrained`'s files, e.g. the
  BERT directory the text encoder reads), loaded with `local_files_only`: nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import zlib
from abc import ABC, abstractmethod
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch

from sslforge.data_pipeline import DataError

log = logging.getLogger("sslforge.data")

WORDS = "words"
PAD_ID, START_ID = 0, 1
WORDS_VOCAB = 1 << 15
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------- tokenisers

class Tokenizer(ABC):
    """Captions -> (ids (B, L) int64, mask (B, L) bool), L = `max_tokens`; padding holds `pad_id`."""

    vocab_size: int
    pad_id: int

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 2:
            raise DataError(f"data.max_tokens must be >= 2 (a start token and a word), got {max_tokens}")
        self.max_tokens = max_tokens

    @abstractmethod
    def ids(self, caption: str) -> list[int]:
        """The caption's ids, cut to `max_tokens`, unpadded."""

    def encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption: ids (L,) padded with `pad_id`, mask (L,) true on its tokens."""
        ids = self.ids(caption)[:self.max_tokens]
        padding = self.max_tokens - len(ids)
        return (torch.tensor(ids + [self.pad_id] * padding, dtype=torch.long),
                torch.tensor([True] * len(ids) + [False] * padding))

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(c) for c in captions]
        if not rows:
            return (torch.zeros(0, self.max_tokens, dtype=torch.long),
                    torch.zeros(0, self.max_tokens, dtype=torch.bool))
        ids, masks = zip(*rows)
        return torch.stack(ids), torch.stack(masks)


def word_id(word: str, vocab_size: int = WORDS_VOCAB) -> int:
    """A word's id in the built-in tokenizer: the same in every process."""
    return 2 + zlib.crc32(word.encode("utf-8")) % (vocab_size - 2)


class WordTokenizer(Tokenizer):
    """Hashed lower-case words after a start token (module docstring: collisions)."""

    pad_id = PAD_ID

    def __init__(self, max_tokens: int, vocab_size: int = WORDS_VOCAB) -> None:
        super().__init__(max_tokens)
        self.vocab_size = vocab_size

    def ids(self, caption: str) -> list[int]:
        words = _WORD.findall(caption.lower())[:self.max_tokens - 1]
        return [START_ID] + [word_id(w, self.vocab_size) for w in words]


class PretrainedTokenizer(Tokenizer):
    """A local Hugging Face tokenizer; its own special tokens ([CLS] ... [SEP] for BERT)."""

    def __init__(self, directory: str, max_tokens: int) -> None:
        super().__init__(max_tokens)
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, ... with pages of advice
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"data.tokenizer={directory}: cannot load a tokenizer from it: {first}") from None
        if self.hf.pad_token_id is None:
            raise DataError(f"data.tokenizer={directory}: the tokenizer has no padding token")
        self.vocab_size, self.pad_id = len(self.hf), int(self.hf.pad_token_id)

    def ids(self, caption: str) -> list[int]:
        return list(self.hf(caption, truncation=True, max_length=self.max_tokens)["input_ids"])


def build_tokenizer(name: str, max_tokens: int) -> Tokenizer:
    """`data.tokenizer`: "words", or a local Hugging Face tokenizer directory (DataError naming
    the path when it is missing or holds no tokenizer files)."""
    if name == WORDS:
        return WordTokenizer(max_tokens)
    directory = os.path.expanduser(name)
    if not os.path.isdir(directory):
        raise DataError(f"data.tokenizer={name}: {directory} is not a directory; expected 'words' or a "
                        "local Hugging Face tokenizer directory (as save_pretrained writes it)")
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        raise DataError(f"data.tokenizer={name}: {directory} holds no tokenizer files "
                        f"({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return PretrainedTokenizer(directory, max_tokens)


# ----------------------------------------------------------------------------- samples

class Text(NamedTuple):
    """One sample's caption and its tokens."""

    caption: str
    ids: torch.Tensor  # (L,) int64
    mask: torch.Tensor  # (L,) bool


def caption_of(fields: Mapping[str, Any]) -> str | None:
    """The caption of a webdataset sample's raw fields: `.txt`, else `.json`'s `caption`
    (None when neither holds a non-blank one); ValueError when they cannot be read."""
    if "txt" in fields:
        text = fields["txt"].decode("utf-8").strip()
        if text:
            return text
    if "json" in fields:
        record = json.loads(fields["json"])
        caption = record.get("caption") if isinstance(record, dict) else None
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"its .json 'caption' is a {type(caption).__name__}, not a string")
        if caption and caption.strip():
            return caption.strip()
    return None


def sample_text(fields: Mapping[str, Any], tokenizer: Tokenizer, key: str, shard: str) -> Text:
    """The caption and tokens of one sample, in the data worker; a sample without a readable
    caption stops the run naming it (a captioned method must not train on empty text)."""
    try:
        caption = caption_of(fields)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"sample {key} of shard {shard}: unreadable caption: {exc}") from None
    if caption is None:
        raise DataError(f"sample {key} of shard {shard} has no caption (a .txt field, or a 'caption' in its "
                        ".json), and this method trains on captions")
    return Text(caption, *tokenizer.encode(caption))


def collate_text(texts: Sequence[Text]) -> dict[str, Any]:
    """The batch keys of captioned samples: `caption`, `text_ids` (B, L), `text_mask` (B, L)."""
    return {"caption": [t.caption for t in texts], "text_ids": torch.stack([t.ids for t in texts]),
            "text_mask": torch.stack([t.mask for t in texts])}


# ----------------------------------------------------------------------------- Localized Narratives

NARRATIVE_BULK = ("traces", "timed_caption")  # mouse traces and word timings: most of a record's bytes
_MISSING_REPORTED = 10


def read_narratives(jsonl: str) -> Iterator[dict[str, Any]]:
    """The records of a Localized Narratives JSONL file, without their bulk fields; DataError
    naming the line of a malformed one."""
    if not os.path.isfile(jsonl):
        raise DataError(f"Localized Narratives file not found: {jsonl}")
    with open(jsonl, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{jsonl}, line {number}: malformed JSON ({exc})") from None
            if not (isinstance(record, dict) and isinstance(record.get("image_id"), (str, int))
                    and isinstance(record.get("caption"), str)):
                raise DataError(f"{jsonl}, line {number}: a narrative needs an 'image_id' and a 'caption' string")
            yield {k: v for k, v in record.items() if k not in NARRATIVE_BULK}


def _image_bytes(path: str, image_size: int | None) -> bytes:
    """The JPEG as is, or re-encoded with its shorter side resized to `image_size`."""
    from PIL import Image

    if image_size is None:
        with open(path, "rb") as f:
            return f.read()
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = image_size / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def narratives_to_shards(jsonl: str, image_dir: str, out: str, max_per_shard: int = 10000,
                         image_size: int | None = None) -> tuple[list[str], int, int]:
    """Localized Narratives + `image_dir/<image_id>.jpg` -> shards of KEY.jpg, KEY.json (the record
    without traces and timings), KEY.txt (the caption); one sample per narrative, so an image
    narrated twice is two samples. Narratives whose image is missing (or unreadable when
    resizing) are skipped and counted. The file is checked whole before anything is written.
    Returns (shards, samples written, narratives skipped)."""
    from sslforge.data_pipeline.shards import write_shards

    if not os.path.isdir(image_dir):
        raise DataError(f"image directory not found: {image_dir}")
    if image_size is not None and image_size <= 0:
        raise DataError(f"--image-size must be > 0, got {image_size}")
    for _ in read_narratives(jsonl):  # a malformed line fails here, leaving no partial shards
        pass
    counts = {"written": 0, "skipped": 0}

    def samples() -> Iterator[dict[str, Any]]:
        for record in read_narratives(jsonl):
            path = os.path.join(image_dir, f"{record['image_id']}.jpg")
            try:
                image = _image_bytes(path, image_size)
            except OSError as exc:  # missing, or not an image PIL can read
                counts["skipped"] += 1
                if counts["skipped"] <= _MISSING_REPORTED:
                    reason = "missing" if not os.path.exists(path) else f"unreadable ({exc})"
                    log.warning("skipping narrative of image %s: %s is %s%s", record["image_id"], path, reason,
                                "; further ones are only counted" if counts["skipped"] == _MISSING_REPORTED else "")
                continue
            yield {"__key__": f"{counts['written']:09d}", "jpg": image, "json": record,
                   "txt": record["caption"]}
            counts["written"] += 1

    paths = write_shards(samples(), out, max_per_shard=max_per_shard)
    return paths, counts["written"], counts["skipped"]
