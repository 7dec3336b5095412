"""How the trainer optimises a method: one engine over the whole method, or one per part.

`MethodEngine` is the common case (one optimiser over `param_groups`). `PartEngines` serves
methods with several optimised parts (`PartsMethod`: a GAN's generator and discriminator).
Both offer the loop the same calls (begin, passes, backward, step, zero_grad, checkpoints).

Each part gets its own optimiser, learning-rate schedule and DeepSpeed engine, built from
`optim` with the part's `optim.parts.<name>` keys on top, so ZeRO, clipping (each part's own
global norm), precision and checkpoints are DeepSpeed's as for one-optimiser methods. The engine
wraps the part's network alone: it reduces and steps that part's parameters and nothing else.

At step t the parts with (t + 1) % every == 0 update, in `part_names` order: each part's loss
is computed through its engine's forward (autocast, DeepSpeed's backward hooks) and
backpropagated through that engine only. A loss that reaches another part's parameters would
mix the parts' gradients (and, under ZeRO 2, feed another engine's reduction buckets): a
gradient hook on every part parameter stops the run at the first such backward, naming it.

A checkpoint holds the whole method's state dict in the usual model file (so evaluation and
export read it as any other run's) and each part's DeepSpeed checkpoint, optimiser state
included, in a sub-directory named after the part.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sslforge.deepspeed_accelerator  # noqa: F401  (before deepspeed: picks its accelerator)
import deepspeed
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from sslforge import distributed
from sslforge.methods.base import PartsMethod
from sslforge.trainer.checkpoint import MODEL_FILE
from sslforge.trainer.engine import build_engine, restore_settings
from sslforge.trainer.group_rules import GroupRules
from sslforge.trainer.optim import build_optimizer
from sslforge.trainer.safe_load import load_data

PART_ONLY_KEYS = ("every",)


def part_config(cfg: DictConfig, name: str) -> DictConfig:
    """`cfg` with `optim` replaced by the part's optimiser settings: its set keys over `optim`'s."""
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.optim.parts[name], resolve=True).items()
                 if v is not None and k not in PART_ONLY_KEYS}
    merged = OmegaConf.to_container(cfg, resolve=True)
    merged["optim"] = {**merged["optim"], **overrides, "parts": {}}
    return OmegaConf.create(merged)


def updating_parts(cfg: DictConfig, names: tuple[str, ...], step: int) -> tuple[str, ...]:
    """The parts that update at `step` (0-based): those with (step + 1) % every == 0."""
    return tuple(name for name in names if (step + 1) % cfg.optim.parts[name].every == 0)


def check_parts_config(cfg: DictConfig, part_names: tuple[str, ...]) -> None:
    """`optim.parts` names exactly the method's parts, and some part updates at every step."""
    given = tuple(cfg.optim.parts.keys())
    if not part_names:
        if given:
            raise ValueError(f"invalid value for 'optim.parts': method '{cfg.method.name}' has one optimiser; "
                             "optim.parts is for methods with several optimised parts")
        return
    missing, unknown = sorted(set(part_names) - set(given)), sorted(set(given) - set(part_names))
    if missing or unknown:
        raise ValueError(f"invalid value for 'optim.parts': method '{cfg.method.name}' has parts "
                         f"{list(part_names)}; missing {missing}, unknown {unknown}")
    for name in part_names:
        if cfg.optim.parts[name].every < 1:
            raise ValueError(f"invalid value for 'optim.parts.{name}.every': must be >= 1")
    if all(cfg.optim.parts[name].every > 1 for name in part_names):
        raise ValueError("invalid value for 'optim.parts': some part must update at every step (every: 1), "
                         "else steps would read batches and update nothing")


class _PartForward(nn.Module):
    """A part's engine module: the part's network is its only child, so the engine reduces and
    steps that part's parameters alone; its forward is the method's `part_step` for the part."""

    def __init__(self, method: PartsMethod, name: str, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.part = name
        object.__setattr__(self, "method", method)  # not a child: the other parts are not this engine's

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        return self.method.part_step(self.part, batch, step)


class CrossPartGradientError(RuntimeError):
    """A part's loss gave a gradient to another part's parameter (the method must detach or freeze)."""


class _GradientOwners:
    """Which part's backward is running; a gradient arriving at another part's parameter is an error."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.active: str | None = None
        for part, module in modules.items():
            for pname, p in module.named_parameters():
                if p.requires_grad:
                    p.register_hook(self._check(part, pname))

    def _check(self, part: str, pname: str):  # type: ignore[no-untyped-def]
        def hook(grad: torch.Tensor) -> None:
            if self.active is not None and self.active != part:
                raise CrossPartGradientError(
                    f"the {self.active}'s loss gave a gradient to the {part}'s parameter '{pname}': compute "
                    f"it on detached {part} outputs, or run the {part} under models.ema.frozen")
        return hook

    @contextmanager
    def backward_of(self, part: str) -> Iterator[None]:
        self.active = part
        try:
            yield
        finally:
            self.active = None


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _check_partition(method: PartsMethod, modules: dict[str, nn.Module]) -> None:
    """Every trainable parameter of the method belongs to exactly one part."""
    owner: dict[int, str] = {}
    for part, module in modules.items():
        for p in _trainable(module):
            if id(p) in owner:
                raise ValueError(f"parts '{owner[id(p)]}' and '{part}' share a parameter; each parameter "
                                 "must have one optimiser")
            owner[id(p)] = part
    orphans = [name for name, p in method.named_parameters() if p.requires_grad and id(p) not in owner]
    if orphans:
        raise ValueError(f"trainable parameters outside every part would never be optimised: {orphans[:3]}")


class MethodEngine:
    """One DeepSpeed engine and optimiser over the whole method (every method but `PartsMethod`)."""

    def __init__(self, method: nn.Module, cfg: DictConfig, total_steps: int, steps_per_epoch: int,
                 local_batch: int, world_size: int) -> None:
        self.method, self.cfg = method, cfg
        self.rules = GroupRules(cfg, total_steps, steps_per_epoch)
        groups = self.rules.prepare(method.param_groups())
        optimizer = build_optimizer(method, groups, cfg, lr=self.rules.peak_lr)
        self.engine = build_engine(method, optimizer, cfg, local_batch, world_size, method.fp32_modules())

    def begin(self, step: int) -> dict[str, float]:
        values = self.rules.apply(self.engine.optimizer, step)
        return {"lr": values.lr, "weight_decay": values.weight_decay}

    def passes(self) -> Iterator[tuple[str, deepspeed.DeepSpeedEngine]]:
        yield "model", self.engine

    def backward(self, part: str, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        """False when DeepSpeed did not apply the update (ZeRO 1/2 check the reduced gradient
        partitions themselves and skip, on every rank, when they are not finite)."""
        self.engine.step()
        return self.engine.was_step_applied()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def optimizers(self) -> list[Any]:
        return [self.engine.optimizer]

    def restore_settings(self) -> None:
        restore_settings(self.engine, self.cfg)

    def checkpointed(self) -> Any:
        """What CheckpointManager saves and loads."""
        return self.engine


class PartEngines:
    """One engine, optimiser and schedule per part; also what `CheckpointManager` saves and loads."""

    def __init__(self, method: PartsMethod, cfg: DictConfig, total_steps: int, steps_per_epoch: int,
                 local_batch: int, world_size: int) -> None:
        self.method, self.cfg = method, cfg
        modules = method.part_modules()
        if tuple(modules) != method.part_names:
            raise ValueError(f"part_modules() gives {list(modules)}, part_names are {list(method.part_names)}")
        _check_partition(method, modules)
        self.configs = {name: part_config(cfg, name) for name in method.part_names}
        self.rules: dict[str, GroupRules] = {}
        self.engines: dict[str, deepspeed.DeepSpeedEngine] = {}
        for name, module in modules.items():
            pcfg = self.configs[name]
            self.rules[name] = GroupRules(pcfg, total_steps, steps_per_epoch)
            wrapper = _PartForward(method, name, module)
            groups = self.rules[name].prepare([{"params": _trainable(module)}])
            optimizer = build_optimizer(wrapper, groups, pcfg, lr=self.rules[name].peak_lr)
            self.engines[name] = build_engine(wrapper, optimizer, pcfg, local_batch, world_size,
                                              method.fp32_modules())
        self.owners = _GradientOwners(modules)

    # ---------------------------------------------------------------- steps
    def begin(self, step: int) -> dict[str, float]:
        """This step's parts (into `method.updating`) and every part's lr and weight decay."""
        self.method.updating = updating_parts(self.cfg, self.method.part_names, step)
        record: dict[str, float] = {}
        for name, engine in self.engines.items():
            values = self.rules[name].apply(engine.optimizer, step)
            record[f"lr_{name}"], record[f"weight_decay_{name}"] = values.lr, values.weight_decay
        return record

    def passes(self) -> Iterator[tuple[str, deepspeed.DeepSpeedEngine]]:
        """(part, engine) for each part updating at this step, in `part_names` order."""
        return ((name, self.engines[name]) for name in self.method.updating)

    def backward(self, part: str, loss: torch.Tensor) -> None:
        with self.owners.backward_of(part):
            self.engines[part].backward(loss)

    def step(self) -> bool:
        """Step the updating parts' engines; False when any of them did not apply its update (ZeRO
        1/2 skip a part whose reduced gradients are not finite, that part alone)."""
        applied = True
        for _, engine in self.passes():
            engine.step()
            applied = applied and engine.was_step_applied()
        return applied

    def zero_grad(self) -> None:
        for engine in self.engines.values():
            engine.zero_grad()

    def optimizers(self) -> list[Any]:
        return [engine.optimizer for engine in self.engines.values()]

    def restore_settings(self) -> None:
        for name, engine in self.engines.items():
            restore_settings(engine, self.configs[name])

    # ---------------------------------------------------------------- checkpoints (CheckpointManager's engine)
    def checkpointed(self) -> "PartEngines":
        return self

    def zero_optimization_stage(self) -> int:
        """0: the model file CheckpointManager checks before loading is the method's whole state;
        the parts' ZeRO files are read (as data only) by their engines."""
        return 0

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        if distributed.rank() == 0:
            torch.save({"module": self.method.state_dict(), "client_state": client_state}, directory / MODEL_FILE)
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=name, save_latest=False)

    def load_checkpoint(self, load_dir: str, tag: str,
                        load_lr_scheduler_states: bool) -> tuple[str | None, dict[str, Any] | None]:
        directory = Path(load_dir) / tag
        for name, engine in self.engines.items():
            loaded, _ = engine.load_checkpoint(str(directory), tag=name,
                                               load_lr_scheduler_states=load_lr_scheduler_states)
            if loaded is None:
                return None, None
        state = load_data(directory / MODEL_FILE)
        self.method.load_state_dict(state["module"])
        return str(directory), state["client_state"]
