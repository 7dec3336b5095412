"""The method contract: what every method declares and what the trainer may call.

A method owns its networks, its loss and its state (queues, prototypes, centres, teachers);
the trainer knows nothing method-specific. Non-trained state lives in buffers or in modules
whose parameters do not require grad, so it is saved in checkpoints but never optimised.

When state may change (the trainer skips a step whose loss or gradients are not finite on any
rank, and must then leave the method exactly as it was):
- `training_step` may change in place only the buffers `forward_buffers` returns: norm layers'
  running statistics, which torch updates during the forward, before the loss is known. The
  trainer copies them before every forward and puts them back when the step is skipped.
- Everything else (queues, centres, prototypes, teachers, cluster assignments) changes only in
  `on_after_optimizer_step`, which a skipped step never reaches. State computed from the batch
  (MoCo's keys, DINO's batch centre) is kept on `self` during the forward and committed there.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig


class Method(nn.Module, metaclass=ABCMeta):
    """Base class; subclasses set `config_class` and implement `views` and `training_step`."""

    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def views(cls, cfg: DictConfig) -> list[ViewConfig]:
        """The crops the data pipeline must deliver, in the order `training_step` expects."""

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """The engine calls the module, so forward is the training step."""
        return self.training_step(batch, step)

    @abstractmethod
    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Returns {"loss": scalar, **metrics}: detached scalars, and `embedding` (B, d), the
        encoder output whose spread is logged as the collapse signal."""

    @abstractmethod
    def encoder(self) -> nn.Module:
        """The network that is evaluated and exported."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, optionally split with keys the trainer understands:
        `no_decay` (no weight decay, no LARS adaptation) and `freeze_steps` (lr held at 0
        for the first steps; under ZeRO-2 `p.grad` is None after backward, so freezing is done
        through the learning rate, not by zeroing gradients)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def fp32_modules(self) -> list[nn.Module]:
        """Modules kept in float32 whatever the engine's precision (EMA teachers)."""
        return []

    def forward_buffers(self) -> list[torch.Tensor]:
        """The buffers `training_step` may change in place, copied before every forward so a
        skipped step can restore them; copied every step, so never large state such as queues.
        Default: the running statistics of every norm layer that tracks them (`_NormBase` is
        torch's common base of BatchNorm, SyncBatchNorm and InstanceNorm, and of
        `GlobalBatchNorm`)."""
        return [buffer for module in self.modules()
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
                for buffer in module.buffers(recurse=False)]

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA teacher update, queue push, prototype normalisation, ...: called only after a
        step that updated the parameters, so state changed here is never left half-updated."""

    def on_epoch_start(self, epoch: int) -> None:
        """Whole-dataset work such as PCL's clustering."""

