"""Method registry: `method.name` in a recipe picks the class and its typed config."""
from __future__ import annotations

from omegaconf import DictConfig

from sslforge.methods.base import Method
from sslforge.methods.byol import BYOL
from sslforge.methods.dino import DINO
from sslforge.methods.dual_encoder import DualEncoder
from sslforge.methods.hcsc import HCSC
from sslforge.methods.linear_probe import LinearProbe
from sslforge.methods.moco_v2 import MoCoV2
from sslforge.methods.moco_v3 import MoCoV3
from sslforge.methods.pcl import PCL
from sslforge.methods.simclr import SimCLR
from sslforge.methods.simsiam import SimSiam
from sslforge.methods.stl import STLLabeler, STLStudent
from sslforge.methods.supcon import SupCon
from sslforge.methods.supervised import Supervised
from sslforge.methods.swav import SwAV
from sslforge.methods.vae import VAE
from sslforge.methods.xmcgan import XMCGAN

METHODS: dict[str, type[Method]] = {"simclr": SimCLR, "byol": BYOL, "simsiam": SimSiam,
                                  "moco_v2": MoCoV2, "moco_v3": MoCoV3, "dino": DINO,
                                  "swav": SwAV, "pcl": PCL, "hcsc": HCSC,
                                  "supcon": SupCon, "supervised": Supervised,
                                  "stl_labeler": STLLabeler, "stl_student": STLStudent,
                                  "dual_encoder": DualEncoder, "vae": VAE, "xmcgan": XMCGAN,
                                  "linear": LinearProbe}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config_class(name: str) -> type:
    return method_class(name).config_class


def build_method(cfg: DictConfig) -> Method:
    return method_class(cfg.method.name)(cfg)
