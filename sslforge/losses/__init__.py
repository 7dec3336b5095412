"""Losses as plain, distributed-aware functions, usable outside the trainer."""
from sslforge.losses.contrastive import nt_xent
from sslforge.losses.cosine import negative_cosine
from sslforge.losses.distillation import dino_center, dino_loss
from sslforge.losses.info_nce import info_nce
from sslforge.losses.precision import autocast_disabled, float32_loss
from sslforge.losses.prototypes import (hcsc_instance_masks, hcsc_instance_nce, hcsc_proto_nce,
                                        hcsc_prototype_masks, proto_nce)
from sslforge.losses.sinkhorn import sinkhorn, swav_loss

__all__ = ["autocast_disabled", "dino_center", "dino_loss", "float32_loss", "hcsc_instance_masks",
           "hcsc_instance_nce", "hcsc_proto_nce", "hcsc_prototype_masks", "info_nce", "negative_cosine",
           "nt_xent", "proto_nce", "sinkhorn", "swav_loss"]
