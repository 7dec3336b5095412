"""Method registry: `method.name` in a recipe picks the class and its typed config."""
from __future__ import annotations

from omegaconf import DictConfig

from sslforge.methods.base import Method
from sslforge.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {"simclr": SimCLR}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config_class(name: str) -> type:
    return method_class(name).config_class


def build_method(cfg: DictConfig) -> Method:
    return method_class(cfg.method.name)(cfg)
