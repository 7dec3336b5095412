"""DeepSpeed as the optimisation engine: ZeRO stage, bf16 compute, gradient clipping.

bf16 uses DeepSpeed's torch_autocast mode (fp32 master weights, bf16 matmuls and convolutions):
batch norm and the EMA teachers of later methods stay in float32, which bf16 weights would break.
"""
from __future__ import annotations

from typing import Any

import deepspeed
import torch
from omegaconf import DictConfig

from sslforge.methods.base import Method


def deepspeed_config(cfg: DictConfig, local_batch: int, world_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": local_batch,
        "train_batch_size": local_batch * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg.engine.grad_clip > 0:
        config["gradient_clipping"] = cfg.engine.grad_clip
    if cfg.engine.precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def build_engine(method: Method, optimizer: torch.optim.Optimizer, cfg: DictConfig,
                 local_batch: int, world_size: int) -> deepspeed.DeepSpeedEngine:
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, config=deepspeed_config(cfg, local_batch, world_size))
    for module in method.fp32_modules():
        module.float()
    return engine


def set_learning_rates(engine: deepspeed.DeepSpeedEngine, lr: float, step: int) -> None:
    """Schedule value for every group; groups still inside `freeze_steps` get 0."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0 if step < group.get("freeze_steps", 0) else lr
