"""Losses as plain, distributed-aware functions, usable outside the trainer."""
from sslforge.losses.contrastive import nt_xent

__all__ = ["nt_xent"]
