"""The training loop: one readable loop that knows nothing method-specific.

Per step: schedule the learning rate, forward the method, agree across ranks that the loss is
finite, backward and step through DeepSpeed, call the method's post-step hook, log, checkpoint.
Every decision that ends or skips work (non-finite loss, stop request) is taken by all ranks
together, since one rank leaving alone would hang the others in the next collective.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.launcher.env import DistEnv
from sslforge.methods import build_method
from sslforge.models.norm import convert_to_global_bn
from sslforge.trainer import preemption
from sslforge.trainer.checkpoint import CheckpointManager, latest_tag, resolve_checkpoint
from sslforge.trainer.engine import build_engine, set_learning_rates
from sslforge.trainer.monitor import Monitor
from sslforge.trainer.optim import build_optimizer
from sslforge.trainer.schedule import cosine_schedule, scaled_lr


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite; the run stopped without checkpointing bad state."""


@dataclass
class TrainResult:
    step: int
    preempted: bool


@dataclass
class Position:
    """Where the run is: saved in every checkpoint so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def embedding_std(h: torch.Tensor) -> torch.Tensor:
    """Std over the batch of L2-normalised embeddings, averaged over dims: ~1/sqrt(d) when
    healthy, 0 when the representation has collapsed to a point."""
    return F.normalize(h.float(), dim=1).std(dim=0).mean()


class Trainer:
    def __init__(self, cfg: DictConfig, env: DistEnv, loader: Any = None) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run_dir)
        if cfg.optim.batch_size % env.world_size:
            raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by "
                             f"the world size {env.world_size}")
        self.local_batch = cfg.optim.batch_size // env.world_size
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        method = build_method(cfg)
        if env.world_size > 1 and cfg.model.sync_bn:
            method = convert_to_global_bn(method, env.device)
        self.method = method.to(env.device)
        self.loader = loader if loader is not None else self._build_loader()
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        peak = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size, cfg.optim.lr_scaling)
        warmup = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.lr_schedule = cosine_schedule(peak, cfg.optim.min_lr, self.total_steps, warmup)
        optimizer = build_optimizer(self.method, self.method.param_groups(), cfg, lr=peak)
        self.engine = build_engine(self.method, optimizer, cfg, self.local_batch, env.world_size)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last)
        self.pos = Position()
        wandb_id = self._resume()
        self.monitor = Monitor(cfg, self.run_dir, self.total_steps, self.pos.step, wandb_id, env.is_main)

    # ----------------------------------------------------------------- set-up
    def _build_loader(self) -> Any:
        from sslforge.data_pipeline.shards import expand_shards
        from sslforge.data_pipeline.stream import ShardLoader
        from sslforge.data_pipeline.views import build_view_transform
        from sslforge.methods import method_class

        views = list(self.cfg.data.views) or method_class(self.cfg.method.name).views(self.cfg)
        return ShardLoader(
            expand_shards(self.cfg.data.train), self.local_batch, build_view_transform(views),
            mode=self.cfg.data.mode, samples_per_epoch=self.cfg.data.samples_per_epoch,
            shuffle_buffer=self.cfg.data.shuffle_buffer, num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed, rank=self.env.rank, world_size=self.env.world_size)

    def _resume(self) -> str | None:
        """Load the checkpoint named by `resume`; returns the wandb run id to continue."""
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            root = self.run_dir / "checkpoints"
            tag = latest_tag(root)
            if tag is None:
                return None
        else:
            root, tag = resolve_checkpoint(Path(resume))
        state = self.checkpoints.load(self.engine, root, tag)
        self.pos = Position(**state["position"])
        return state.get("wandb_id")

    # ------------------------------------------------------------------ steps
    def forward_backward(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward and (when every rank's loss is finite) backward; returns (outputs, finite)."""
        batch = {k: [v.to(self.env.device, non_blocking=True) for v in batch[k]] if k == "views"
                 else v for k, v in batch.items()}
        out = self.engine(batch, self.pos.step)
        finite = not distributed.any_rank(not bool(torch.isfinite(out["loss"]).item()), self.env.device)
        if finite:
            self.engine.backward(out["loss"])
        return out, finite

    def _step(self, batch: dict[str, Any]) -> dict[str, Any]:
        lr = float(self.lr_schedule[self.pos.step])
        set_learning_rates(self.engine, lr, self.pos.step)
        out, finite = self.forward_backward(batch)
        if finite:
            self.engine.step()
            self.method.on_after_optimizer_step(self.pos.step, self.total_steps)
            self.pos.nonfinite_steps = 0
        else:
            self.engine.zero_grad()
            self.pos.nonfinite_steps += 1
            if self.cfg.train.on_nonfinite == "stop" or self.pos.nonfinite_steps > self.cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss is non-finite at step {self.pos.step} ({self.pos.nonfinite_steps} step(s) in a row); "
                    "stopping without writing a checkpoint")
        record: dict[str, Any] = {"lr": lr, "loss": float(distributed.all_reduce_mean(out["loss"].detach()).item())}
        if "embedding" in out:
            record["embedding_std"] = float(distributed.all_reduce_mean(embedding_std(out["embedding"])).item())
        for key, value in out.items():
            if key not in ("loss", "embedding") and torch.is_tensor(value) and value.numel() == 1:
                record[key] = float(distributed.all_reduce_mean(value.detach().float()).item())
        record["nonfinite_skipped"] = not finite
        return record

    # ------------------------------------------------------------------- loop
    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to the end (or to `stop_at_step`, or a stop request), checkpointing on the way."""
        cfg, pos = self.cfg, self.pos
        last_ckpt = last_eval = pos.step
        try:
            while pos.step < self.total_steps:
                self.method.on_epoch_start(pos.epoch)
                self.loader.set_epoch(pos.epoch, skip_batches=pos.batch_in_epoch)
                window = _Window(time.perf_counter())
                batches: Iterator[dict[str, Any]] = iter(self.loader)
                while pos.batch_in_epoch < self.steps_per_epoch and pos.step < self.total_steps:
                    t0 = time.perf_counter()
                    batch = next(batches)
                    window.data_wait += time.perf_counter() - t0
                    pos.skipped_samples += int(batch.get("skipped", 0))
                    record = self._step(batch)
                    pos.step += 1
                    pos.batch_in_epoch += 1
                    window.steps += 1
                    self.monitor.advance(pos.step, f"loss {record['loss']:.4f}")
                    if pos.step % cfg.train.log_every_steps == 0 or pos.step == self.total_steps:
                        self._log_train(record, window)
                        window = _Window(time.perf_counter())
                    stop = distributed.any_rank(preemption.stop_requested() or pos.step == stop_at_step)
                    if stop or pos.step - last_ckpt >= cfg.train.ckpt_every_steps:
                        self.save()
                        last_ckpt = pos.step
                    if stop:
                        return TrainResult(pos.step, preempted=True)
                if pos.batch_in_epoch == self.steps_per_epoch:
                    pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                    if cfg.eval.every_epochs and pos.epoch % cfg.eval.every_epochs == 0:
                        self.evaluate()
                        last_eval = pos.step
            if last_ckpt != pos.step:
                self.save()
            if last_eval != pos.step:
                self.evaluate()
            return TrainResult(pos.step, preempted=False)
        finally:
            self.monitor.close()

    def _log_train(self, record: dict[str, Any], window: "_Window") -> None:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        skipped = int(distributed.all_reduce_sum(torch.tensor(float(self.pos.skipped_samples))).item())
        self.monitor.log({
            "step": self.pos.step, "epoch": self.pos.epoch, **record,
            "samples_per_s": window.steps * self.cfg.optim.batch_size / elapsed,
            "data_wait_frac": window.data_wait / elapsed,
            "skipped_samples": skipped, "world_size": self.env.world_size,
        })

    def save(self) -> None:
        """Checkpoint (collective); refuses to write parameters that are not finite."""
        finite = all(torch.isfinite(p).all() for p in self.method.parameters())
        if distributed.any_rank(not finite, self.env.device):
            raise NonFiniteLossError(f"parameters are non-finite at step {self.pos.step}; checkpoint not written")
        self.checkpoints.save(self.engine, self.pos.step,
                              {"position": vars(self.pos).copy(), "wandb_id": self.monitor.wandb_id})

    def evaluate(self) -> float | None:
        """Weighted kNN top-1 of the encoder on `data.val` (skipped when no val set)."""
        if not self.cfg.data.val:
            return None
        from sslforge.eval.knn import knn_top1

        top1 = knn_top1(self.method.encoder(), self.cfg, self.env)
        self.monitor.log({"step": self.pos.step, "epoch": self.pos.epoch, "knn_top1": top1})
        return top1


@dataclass
class _Window:
    """Throughput bookkeeping between two log lines."""

    start: float
    steps: int = 0
    data_wait: float = 0.0


def run(cfg: DictConfig, install_signal_handlers: bool = True) -> TrainResult:
    """One rank's whole job: process group, trainer, fit. Used by every launch path."""
    from sslforge.launcher.env import init_distributed

    env = init_distributed(cfg.engine.backend, cfg.engine.collective_timeout_min)
    if install_signal_handlers:
        preemption.install_handlers()
    return Trainer(cfg, env).fit()


__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "run"]
