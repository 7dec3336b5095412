"""Losses as plain, distributed-aware functions, usable outside the trainer."""
from sslforge.losses.contrastive import nt_xent
from sslforge.losses.precision import autocast_disabled, float32_loss

__all__ = ["autocast_disabled", "float32_loss", "nt_xent"]
