"""Losses as plain, distributed-aware functions, usable outside the trainer."""
from sslforge.losses.contrastive import nt_xent
from sslforge.losses.cosine import negative_cosine
from sslforge.losses.debiased import debiased_nt_xent
from sslforge.losses.decoupled import dcl_loss
from sslforge.losses.directclr import directclr_loss
from sslforge.losses.distillation import dino_center, dino_loss
from sslforge.losses.false_negatives import fnc_false_negatives, fnc_loss
from sslforge.losses.hard_negatives import mochi_info_nce
from sslforge.losses.info_nce import info_nce
from sslforge.losses.precision import autocast_disabled, float32_loss
from sslforge.losses.prototypes import (hcsc_instance_masks, hcsc_instance_nce, hcsc_proto_nce,
                                        hcsc_prototype_masks, proto_nce)
from sslforge.losses.shared_random import shared_randint, shared_uniforms
from sslforge.losses.sinkhorn import sinkhorn, swav_loss
from sslforge.losses.supcon import supcon_loss

__all__ = ["autocast_disabled", "dcl_loss", "debiased_nt_xent", "dino_center", "dino_loss", "directclr_loss",
           "float32_loss", "fnc_false_negatives", "fnc_loss", "hcsc_instance_masks", "hcsc_instance_nce",
           "hcsc_proto_nce", "hcsc_prototype_masks", "info_nce", "mochi_info_nce", "negative_cosine",
           "nt_xent", "proto_nce", "shared_randint", "shared_uniforms", "sinkhorn", "supcon_loss",
           "swav_loss"]
