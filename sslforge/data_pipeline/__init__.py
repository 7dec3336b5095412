"""Shards in, batches of augmented views out: writing, streaming, augmentation, built-in data."""


class DataError(RuntimeError):
    """Bad data input (missing shard, unreadable pattern); the message names the path."""
