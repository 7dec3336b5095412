"""The method contract: what every method declares and what the trainer may call.

A method owns its networks, its loss and its state (queues, prototypes, centres, teachers);
the trainer knows nothing method-specific and never names a method. Where each need goes:

- Crops: `views` (one `ViewConfig` per augmentation pipeline, `count` crops each, any sizes:
  BYOL's asymmetric pair, DINO's 2 global + N local crops). `batch["views"]` is the list of crops
  in that order, one (B, 3, size, size) tensor each; `models.multicrop` runs a backbone once per
  resolution.
- Loss: `training_step`, written with the plain distributed-aware functions of `sslforge.losses`.
- Scalars that change per step (EMA momentum, teacher temperature): `schedules` returns one
  value per optimiser step, built once; before each step the trainer sets `self.scheduled` to
  that step's values, read in `training_step` and `on_after_optimizer_step`. Learning rate and
  weight decay are the trainer's (`optim.*`; `optim.weight_decay_end` makes weight decay a
  per-step cosine on the decayed groups, as DINO's).
- Parameter groups with their own rules: `param_groups` (keys below).
- Gradient clipping: `engine.grad_clip` with `engine.grad_clip_mode` global (DeepSpeed's norm over
  all parameters) or per_param (each parameter's gradient norm, as DINO's `clip_gradients`).
- Teachers, key encoders: modules whose parameters do not require grad, outside the optimiser,
  updated in `on_after_optimizer_step` (`models.ema`), kept float32 by `fp32_modules`.
- Queues, centres, prototypes: buffers, so checkpoints save and restore them exactly.
- The evaluated and exported network: `encoder` (DINO: the teacher backbone; MoCo: the query one).
- Supervised methods: `classifier`, the network that maps images to class logits (its EMA copy
  when one is kept), scored by top-1 on `data.val` at each evaluation and by
  `sslforge eval robustness`; one with per-token logits also has `forward_dense`
  (`models/token_classifier.py`), which `sslforge eval token-labels` draws.
- Config checks of its own (key ranges, options that do not fit): `check_config`, run when the
  recipe is loaded, before any process starts.
- Labels (supervised methods): `needs_labels`; the loader then refuses a sample without `.cls`,
  naming its shard, and `batch["label"]` holds them.
- Captions (text-to-image, image-text methods): `needs_captions`; the loader then refuses a sample
  without a caption (`.txt`, or the `caption` field of `.json`), naming its shard, and the batch
  holds `caption` (list of str), `text_ids` (B, L) int64 and `text_mask` (B, L) bool, tokenised
  by `data.tokenizer` (`data_pipeline/captions.py`).
- Evaluation of its own (generative methods: ELBO, FID, sample grids): `evaluate`, called on every
  rank at each evaluation instead of the kNN / classifier score; returns the scalars to log and
  may write images through the context.
- Several networks with their own optimisers (GANs): subclass `PartsMethod` below.
- Training data other than crops (the linear probe's cached features): `training_loader`.
- Keys taken from elsewhere when the recipe loads (the linear probe's `model`: its pretrained
  run's): `resolve_config`.
- Whole-dataset work before an epoch (PCL's and HCSC's k-means): `epoch_features_encoder` names
  the network, the trainer extracts every training sample's feature with it (all ranks in
  parallel, the evaluation transform, each sample once, in sample-index order: the `index` the
  training batches carry) and hands them to `on_epoch_start`.

When state may change (the trainer skips a step whose loss or gradients are not finite on any
rank, and must then leave the method exactly as it was):
- `training_step` may change in place only the buffers `forward_buffers` returns: norm layers'
  running statistics, which torch updates during the forward, before the loss is known. The
  trainer copies them before every forward and puts them back when the step is skipped.
- Everything else (queues, centres, prototypes, teachers, cluster assignments) changes only in
  `on_after_optimizer_step`, which a skipped step never reaches. State computed from the batch
  (MoCo's keys, DINO's batch centre) is kept on `self` during the forward and committed there.
  (MoCo's key encoder is updated there, after the optimiser, which is the same sequence as the
  paper's update at the start of the next forward.)
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import torch
import torch.nn as nn
from omegaconf import DictConfig

from sslforge.config import MethodConfig, ViewConfig
from sslforge.eval.features import DatasetFeatures


@dataclass
class EvalContext:
    """What a method's own `evaluate` gets from the trainer."""

    cfg: DictConfig
    env: Any  # launcher.env.DistEnv: rank, world size, device
    step: int
    epoch: int
    total_steps: int  # the run's last step: an evaluation at it is the final one
    images_dir: Path  # where image grids go (run_dir/images), created on rank 0
    log_image: Callable[[str, Path], None]  # (metric name, PNG path): into wandb when it is on; rank 0


class Method(nn.Module, metaclass=ABCMeta):
    """Base class; subclasses set `config_class` and implement `views` and `training_step`."""

    config_class: type[MethodConfig] = MethodConfig
    needs_labels = False  # supervised methods: a training sample without a `.cls` label is an error
    needs_captions = False  # text methods: a training sample without a caption is an error

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scheduled: dict[str, float] = {}  # this step's values of `schedules`, set by the trainer

    @classmethod
    def resolve_config(cls, cfg: DictConfig) -> None:
        """Keys the method takes from elsewhere, set in place when the recipe is loaded, before
        the checks (the linear probe: the pretrained run's `model` section). Raise ConfigError."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """The method's own checks of the whole config (key ranges, options that do not fit):
        `config.validate` runs them when a recipe is loaded, before any process starts. Raise
        ValueError naming the key."""

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

    def classifier(self) -> nn.Module | None:
        """The image-to-logits network evaluated by top-1 (supervised methods), or None."""
        return None

    def evaluate(self, context: EvalContext) -> dict[str, float] | None:
        """The method's own evaluation (collective: every rank calls it), or None for the
        trainer's (classifier top-1, else kNN top-1 of `encoder`)."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, optionally split into groups with keys the trainer understands:
        - `no_decay`: no weight decay and no LARS adaptation (biases and norm weights are split
          off automatically when `optim.exclude_bias_and_norm`);
        - `fixed_lr`: the group's learning rate stays at the scaled peak, no warm-up or decay
          (SimSiam's predictor);
        - `freeze_epochs`: for the first `round(freeze_epochs * steps_per_epoch)` steps the
          parameters and their optimiser state do not move (DINO's last layer): their gradients
          are zeroed as they are produced, and the group's lr and weight decay held at 0, under
          every ZeRO stage and precision."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step values of the method's own scalars, `total_steps` long each
        (`trainer.schedule` has the published shapes); the trainer puts step t's values in
        `self.scheduled` before step t."""
        return {}

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

    def training_loader(self, env: Any, local_batch: int) -> Any:
        """A loader of the method's own (`len`, `set_epoch(epoch, skip_batches)`, iteration over
        this rank's batches) in place of the shard stream's crops: the linear probe's cached
        features. None (the default): the shard stream."""
        return None

    def epoch_features_encoder(self, epoch: int) -> nn.Module | None:
        """The network whose features of every training sample the method needs before `epoch`
        (PCL: its momentum encoder), or None for no whole-dataset pass (the default)."""
        return None

    def on_epoch_start(self, epoch: int, features: DatasetFeatures | None) -> dict[str, float]:
        """Whole-dataset work (PCL's clustering) before the epoch's first step; `features` are
        every training sample's, when `epoch_features_encoder` asked. Not called again when a
        run resumes inside the epoch, so what it computes must be checkpointed (buffers, or
        `get_extra_state` for state whose shape the dataset decides). Returns scalars to log."""
        return {}



class PartsMethod(Method):
    """A method whose networks have their own optimisers (XMC-GAN: generator and discriminator).

    Each part in `part_names` gets its own DeepSpeed engine and optimiser, set by
    `optim.parts.<name>` (any `optim.*` key, plus `every`: the part updates at the steps t with
    (t + 1) % every == 0, so discriminator every 1 and generator every 2 is XMC-GAN's 2:1).
    At each step the trainer sets `self.updating` (the parts that update, in `part_names` order),
    then for each of them calls `part_step` and backpropagates its loss through that part's
    engine alone, and steps the engines once every loss was finite on every rank.

    A part's loss must give gradients to its own parameters only: detach another part's outputs
    (fake images for the discriminator) or run the other part with its parameters frozen
    (`models.ema.frozen`); the trainer stops the run naming the parameter that got a gradient
    from another part's loss. Computation shared by the parts of one step (the generator's
    images) may be kept on `self` by the first `part_step` for the next ones.
    `on_after_optimizer_step` runs once after the step (the EMA generator: when the generator
    is in `self.updating`). Each part's optimiser state and the whole method's state are
    checkpointed; `param_groups` is not used.
    """

    part_names: tuple[str, ...] = ()

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.updating: tuple[str, ...] = ()

    @abstractmethod
    def part_modules(self) -> dict[str, nn.Module]:
        """The network of each part (its trainable parameters are the part's), by name."""

    @abstractmethod
    def part_step(self, part: str, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """{"loss": this part's scalar loss, **metrics} at this step (metric names unique
        across parts)."""

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} is trained part by part (part_step), not by training_step")
