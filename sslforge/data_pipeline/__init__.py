"""Shards in, batches of augmented views out: writing, streaming, augmentation, built-in data."""
from __future__ import annotations

import importlib
from typing import Any


class DataError(RuntimeError):
    """Bad data input (missing shard, unreadable pattern); the message names the path."""


# Public names, imported on first use: `from sslforge.data_pipeline import DataError` (the CLI's
# error handling) must not pay for importing torchvision, webdataset and PIL.
_EXPORTS = {
    "expand_shards": "shards", "shard_sizes": "shards", "write_shards": "shards",
    "imagefolder_to_shards": "imagefolder", "ShardLoader": "stream", "eval_batches": "eval_stream",
    "build_view_transform": "views", "build_eval_transform": "views",
    "write_synthetic": "synth",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
