"""DeepSpeed as the optimisation engine: ZeRO stage, bf16 compute, gradient clipping.

bf16 uses DeepSpeed's torch_autocast mode (fp32 master weights, bf16 matmuls and convolutions):
batch norm and the EMA teachers of later methods stay in float32, which bf16 weights would break.
Only the compute is bf16: gradients are reduced across ranks in float32 under every ZeRO stage.

Every setting that changes the numbers is written out, never left to DeepSpeed's defaults (an
absent `gradient_clipping` means 1.0), and the engine's own report is checked against the config
once it is built, so a default that moves in a DeepSpeed release cannot change a run silently.
"""
from __future__ import annotations

from typing import Any, Iterable

import sslforge.deepspeed_accelerator  # noqa: F401  (before deepspeed: picks its accelerator)
import deepspeed
import torch
import torch.nn as nn
from omegaconf import DictConfig


def deepspeed_config(cfg: DictConfig, local_batch: int, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": local_batch,
        "train_batch_size": local_batch * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": global_clip(cfg),  # 0.0 disables
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        # weights, gradients and optimiser state in fp32; autocast is the only reduced precision
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "data_types": {"grad_accum_dtype": "fp32"},
        "torch_autocast": _autocast_config(cfg.engine.precision),
        "communication_data_type": "fp32",
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def global_clip(cfg: DictConfig) -> float:
    """The norm DeepSpeed clips the global gradient to (0: off; per-parameter clipping is the
    trainer's, after the gradients are averaged)."""
    return float(cfg.engine.grad_clip) if cfg.engine.grad_clip_mode == "global" else 0.0


def _autocast_config(precision: str) -> dict[str, Any]:
    if precision != "bf16":
        return {"enabled": False}
    # No module is declared "lower-precision safe": DeepSpeed tags the parameters of the ones
    # that are (Linear and Conv by default) with a bf16 communication dtype, and ZeRO 1/2 then
    # averages their gradients across ranks in bf16.
    return {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def expected_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the engine must report for `cfg` (the names are the engine's accessors)."""
    bf16 = cfg.engine.precision == "bf16"
    clip = global_clip(cfg)
    return {"gradient_clipping": clip, "optimizer_clip_grad": clip,
            "zero_optimization_stage": cfg.engine.zero_stage,
            "torch_autocast_enabled": bf16,
            "torch_autocast_dtype": torch.bfloat16 if bf16 else None,
            "bfloat16_enabled": False, "fp16_enabled": False,
            "communication_data_type": torch.float32,
            "gradient_comm_dtypes": {torch.float32}}


def reported_settings(engine: deepspeed.DeepSpeedEngine) -> dict[str, Any]:
    """The settings the engine applies, as it reports them."""
    # The dtype each parameter's gradient is reduced in is DeepSpeed's per-parameter tag
    # (torch_autocast.get_comm_dtype, read by ZeRO 1/2); the engine has no accessor for it.
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    return {"gradient_clipping": engine.gradient_clipping(),
            # ZeRO 1/2 clip with their optimiser's own copy (restored from checkpoints)
            "optimizer_clip_grad": getattr(engine.optimizer, "clip_grad", engine.gradient_clipping()),
            "zero_optimization_stage": engine.zero_optimization_stage(),
            "torch_autocast_enabled": engine.torch_autocast_enabled(),
            "torch_autocast_dtype": engine.torch_autocast_dtype(),
            "bfloat16_enabled": engine.bfloat16_enabled(), "fp16_enabled": engine.fp16_enabled(),
            "communication_data_type": engine.communication_data_type,
            "gradient_comm_dtypes": {get_comm_dtype(p) for p in engine.module.parameters()}}


def check_settings(engine: deepspeed.DeepSpeedEngine, cfg: DictConfig) -> None:
    """Raise when the engine would train with settings other than the config's."""
    expected, reported = expected_settings(cfg), reported_settings(engine)
    wrong = [f"{k}={reported[k]!r} (config: {v!r})" for k, v in expected.items() if reported[k] != v]
    if wrong:
        raise RuntimeError(f"DeepSpeed engine settings differ from the config: {', '.join(wrong)}")


def restore_settings(engine: deepspeed.DeepSpeedEngine, cfg: DictConfig) -> None:
    """After loading a checkpoint: the config's settings win over the checkpoint's.

    ZeRO 1/2 restore the clipping norm saved in the checkpoint (`clip_grad` in the optimiser
    state), so a run resumed with another `engine.grad_clip` (or from a checkpoint written when
    an absent key meant 1.0) would keep the old value; `clip_grad` is the attribute ZeRO 1/2
    read at every step, with no public setter.
    """
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = global_clip(cfg)
    check_settings(engine, cfg)


def build_engine(module: nn.Module, optimizer: torch.optim.Optimizer, cfg: DictConfig,
                 local_batch: int, world_size: int, fp32_modules: Iterable[nn.Module] = ()) -> deepspeed.DeepSpeedEngine:
    """The engine over `module` (the method, or one part of a `PartsMethod`); `fp32_modules`
    (EMA teachers) are put back in float32 once DeepSpeed has placed the module."""
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, local_batch, world_size))
    for fp32 in fp32_modules:
        fp32.float()
    check_settings(engine, cfg)
    return engine
