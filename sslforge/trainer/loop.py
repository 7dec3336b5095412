"""The training loop: one readable loop that knows nothing method-specific.

Per step: schedule the learning rate, forward the method, agree across ranks that the loss and
then the gradients are finite, step through DeepSpeed, call the method's post-step hook, log,
checkpoint. A skipped step puts back what the forward changed (`nonfinite.py`).
Every decision that ends or skips work (non-finite loss, stop request) is taken by all ranks
together, since one rank leaving alone would hang the others in the next collective.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import evaluates_at_end
from sslforge.data_pipeline.views import model_input
from sslforge.launcher.env import DistEnv
from sslforge.launcher.watchdog import PeerLostHook, watch_peers
from sslforge.methods import build_method
from sslforge.methods.base import EvalContext, PartsMethod
from sslforge.models.norm import convert_to_global_bn
from sslforge.trainer import preemption
from sslforge.trainer.checkpoint import CheckpointManager
from sslforge.trainer.group_rules import clip_per_parameter, method_schedules, warmup_warnings
from sslforge.trainer.monitor import Monitor
from sslforge.trainer.nonfinite import (BufferSnapshot, all_finite, grads_finite, nonfinite_tensors,
                                        refusal_message, skipped_summary)
from sslforge.trainer.parts import MethodEngine, PartEngines


class NonFiniteLossError(RuntimeError):
    """Non-finite values ended the run (too many skipped steps, a run that ended skipping, or
    state a checkpoint may not hold); nothing non-finite was written."""


@dataclass
class TrainResult:
    step: int
    preempted: bool
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradients, over the whole run
    warning: str | None = None  # what the run's last line must say although it succeeded


@dataclass
class Position:
    """Where the run is: saved in every checkpoint so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0  # skipped in a row, up to now
    nonfinite_total: int = 0  # skipped over the whole run; first/last: step numbers as logged, 0 if none
    first_nonfinite_step: int = 0
    last_nonfinite_step: int = 0


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
        if loader is None:
            loader = self.method.training_loader(env, self.local_batch)
        self.loader = loader if loader is not None else self._build_loader()
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        if env.is_main:
            for line in warmup_warnings(cfg, self.total_steps, self.steps_per_epoch):
                print(f"sslforge: warning: {line}", file=sys.stderr, flush=True)
        self.schedules = method_schedules(self.method.schedules(self.total_steps, self.steps_per_epoch),
                                          self.total_steps)
        engines = PartEngines if isinstance(self.method, PartsMethod) else MethodEngine
        self.engines = engines(self.method, cfg, self.total_steps, self.steps_per_epoch, self.local_batch,
                               env.world_size)
        self.engine = self.engines.checkpointed()  # DeepSpeed's engine (one-optimiser methods)
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

        method = method_class(self.cfg.method.name)
        views = list(self.cfg.data.views) or method.views(self.cfg)
        tokenizer = None
        if method.needs_captions:
            from sslforge.data_pipeline.captions import build_tokenizer

            tokenizer = build_tokenizer(self.cfg.data.tokenizer, self.cfg.data.max_tokens)
        return ShardLoader(
            expand_shards(self.cfg.data.train), self.local_batch, build_view_transform(views),
            mode=self.cfg.data.mode, samples_per_epoch=self.cfg.data.samples_per_epoch,
            shuffle_buffer=self.cfg.data.shuffle_buffer, num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed, rank=self.env.rank, world_size=self.env.world_size,
            require_labels=method.needs_labels, tokenizer=tokenizer, pin_memory=self.env.device.type == "cuda")

    def _resume(self) -> str | None:
        """Load the checkpoint `resume` names (auto: this run's best loadable one, agreed by every
        rank; an existing run that cannot be loaded is an error, never a fresh start); returns
        the wandb run id to continue."""
        state = self.checkpoints.resume(self.engine, self.cfg.resume)
        if state is None:
            return None
        self.engines.restore_settings()  # ZeRO 1/2 bring back the checkpoint's clipping norm
        self.pos = Position(**state["position"])
        return state.get("wandb_id")

    # ------------------------------------------------------------------ steps
    def begin_step(self) -> dict[str, float]:
        """This step's schedule values: into the optimisers' groups and the method's `scheduled`
        (and, for a `PartsMethod`, the parts that update into its `updating`)."""
        values = self.engines.begin(self.pos.step)
        self.method.scheduled = {name: float(v[self.pos.step]) for name, v in self.schedules.items()}
        return {**values, **self.method.scheduled}

    def forward_backward(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward and (when every rank's loss is finite) backward, per engine pass (one, or one
        per updating part); returns (outputs, finite): finite when, on every rank, the losses,
        the running statistics the forwards updated and the gradients are (an overflow can
        happen in the backward)."""
        batch = {k: [model_input(v.to(self.env.device, non_blocking=True)) for v in batch[k]] if k == "views"
                 else v.to(self.env.device, non_blocking=True) if k in ("text_ids", "text_mask")
                 else v for k, v in batch.items()}
        outs: dict[str, dict[str, torch.Tensor]] = {}
        finite = True
        for part, engine in self.engines.passes():
            outs[part] = out = engine(batch, self.pos.step)
            forward_ok = bool(torch.isfinite(out["loss"]).item()) and all_finite(self.method.forward_buffers())
            finite = not distributed.any_rank(not forward_ok)
            if not finite:
                break
            self.engines.backward(part, out["loss"])
        if finite:
            finite = not distributed.any_rank(not grads_finite(self.method))
        if finite and self.cfg.engine.grad_clip_mode == "per_param" and self.cfg.engine.grad_clip:
            clip_per_parameter(self.method.parameters(), self.cfg.engine.grad_clip)  # averaged grads (ZeRO 0)
        return merge_outputs(outs), finite

    def apply_step(self) -> bool:
        """The optimiser step(s), then the method's post-step hook; False when not applied."""
        if not self.engines.step():
            return False
        self.method.on_after_optimizer_step(self.pos.step, self.total_steps)
        return True

    def _step(self, batch: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = self.begin_step()
        before = BufferSnapshot(self.method.forward_buffers())  # the forward updates running statistics
        out, finite = self.forward_backward(batch)
        finite = finite and self.apply_step()
        if finite:
            self.pos.nonfinite_steps = 0
        else:
            self._skip(before)
        record["loss"] = float(distributed.all_reduce_mean(out["loss"].detach()).item())
        if "embedding" in out:
            record["embedding_std"] = float(distributed.all_reduce_mean(embedding_std(out["embedding"])).item())
        for key, value in out.items():
            if key not in ("loss", "embedding") and torch.is_tensor(value) and value.numel() == 1:
                record[key] = float(distributed.all_reduce_mean(value.detach().float()).item())
        record["nonfinite_skipped"] = not finite
        return record

    def _skip(self, before: BufferSnapshot) -> None:
        """Leave the method as it was before the step, count it, stop when the policy says so."""
        self.engines.zero_grad()
        before.restore()
        pos = self.pos
        pos.nonfinite_steps += 1
        pos.nonfinite_total += 1
        pos.first_nonfinite_step = pos.first_nonfinite_step or pos.step + 1
        pos.last_nonfinite_step = pos.step + 1
        if self.cfg.train.on_nonfinite == "stop" or pos.nonfinite_steps > self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"loss, running statistics or gradients non-finite at step {pos.step} "
                f"({pos.nonfinite_steps} step(s) in a row); "
                "stopping without writing a checkpoint")

    # ------------------------------------------------------------------- loop
    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to the end (or to `stop_at_step`, or a stop request), checkpointing on the way."""
        cfg, pos = self.cfg, self.pos
        last_ckpt = last_eval = pos.step
        batches: Iterator[dict[str, Any]] = iter(())
        try:
            while pos.step < self.total_steps:
                if pos.batch_in_epoch == 0:  # a resume inside the epoch has its state already
                    self.epoch_start()
                self.loader.set_epoch(pos.epoch, skip_batches=pos.batch_in_epoch)
                window = _Window(time.perf_counter())
                batches = iter(self.loader)
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
            if last_eval != pos.step and evaluates_at_end(cfg):
                self.evaluate()
            return self._finish()
        finally:
            _close(batches)
            self.monitor.close()

    def epoch_start(self) -> None:
        """The method's whole-dataset work before an epoch: the features of every training
        sample when it asks for them (all ranks, every sample once), then `on_epoch_start`."""
        epoch = self.pos.epoch
        encoder = self.method.epoch_features_encoder(epoch)
        features, record = None, {}
        if encoder is not None:
            from sslforge.eval.features import extract_features

            t0 = time.perf_counter()
            features = extract_features(encoder, self.cfg.data.train, self.cfg.data.image_size,
                                        self.cfg.eval.batch_size, self.env, self.cfg.data.num_workers)
            record["epoch_features_s"] = time.perf_counter() - t0
        record.update(self.method.on_epoch_start(epoch, features))
        if record:
            self.monitor.log({"step": self.pos.step, "epoch": epoch, **record})

    def _log_train(self, record: dict[str, Any], window: "_Window") -> None:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        skipped = int(distributed.sum_over_ranks(self.pos.skipped_samples))
        self.monitor.log({
            "step": self.pos.step, "epoch": self.pos.epoch, **record,
            "samples_per_s": window.steps * self.cfg.optim.batch_size / elapsed,
            "data_wait_frac": window.data_wait / elapsed,
            "skipped_samples": skipped, "world_size": self.env.world_size,
        })

    def _finish(self) -> TrainResult:
        """A run that skipped steps logs how many and says so in its last line; it fails when its
        last step was skipped too: the model stopped learning before the end."""
        pos = self.pos
        if not pos.nonfinite_total:
            return TrainResult(pos.step, preempted=False)
        self.monitor.log({"step": pos.step, "nonfinite_skipped_steps": pos.nonfinite_total,
                          "first_nonfinite_step": pos.first_nonfinite_step,
                          "last_nonfinite_step": pos.last_nonfinite_step})
        summary = skipped_summary(pos.nonfinite_total, pos.first_nonfinite_step, pos.last_nonfinite_step, pos.step)
        if pos.nonfinite_steps:
            raise NonFiniteLossError(f"training ended with its last {pos.nonfinite_steps} step(s) skipped, so the "
                                     f"model has not learnt since step {pos.step - pos.nonfinite_steps}: {summary}")
        return TrainResult(pos.step, preempted=False, skipped_steps=pos.nonfinite_total, warning=summary)

    def save(self) -> None:
        """Checkpoint (collective). Refuses state holding a NaN or inf on any rank (parameters,
        buffers, optimiser state): every checkpoint on disk is finite, so `keep_last` can only
        prune finite checkpoints older than a finite one."""
        bad = nonfinite_tensors(self.method, *self.engines.optimizers())
        if distributed.any_rank(bool(bad)):
            pointer = self.checkpoints.root / "latest"
            latest = pointer.read_text().strip() if pointer.is_file() else None
            raise NonFiniteLossError(refusal_message(bad, self.pos.step, latest))
        self.checkpoints.save(self.engine, self.pos.step,
                              {"position": vars(self.pos).copy(), "wandb_id": self.monitor.wandb_id})

    def evaluate(self) -> float | None:
        """On `data.val` (skipped when there is none): the method's own evaluation when it has
        one (generative methods), a supervised method's classifier top-1 and top-5, else the
        weighted kNN top-1 of the encoder."""
        if not self.cfg.data.val:
            return None
        record = self.method.evaluate(self._eval_context())
        classifier = self.method.classifier()
        if record is None and classifier is not None:
            from sslforge.eval.classify import classifier_accuracy

            acc = classifier_accuracy(classifier, self.cfg.data.val, self.cfg.data.image_size,
                                      self.cfg.eval.batch_size, self.env, self.cfg.data.num_workers)
            record = {"val_top1": acc["top1"], "val_top5": acc["top5"]}
        elif record is None:
            from sslforge.eval.knn import knn_top1

            record = {"knn_top1": knn_top1(self.method.encoder(), self.cfg, self.env)}
        self.monitor.log({"step": self.pos.step, "epoch": self.pos.epoch, **record})
        return next(iter(record.values()), None)

    def _eval_context(self) -> EvalContext:
        images = self.run_dir / "images"
        if self.env.is_main:
            images.mkdir(parents=True, exist_ok=True)
        return EvalContext(self.cfg, self.env, self.pos.step, self.pos.epoch, self.total_steps, images,
                           lambda name, path: self.monitor.log_image(name, path, self.pos.step))


@dataclass
class _Window:
    """Throughput bookkeeping between two log lines."""

    start: float
    steps: int = 0
    data_wait: float = 0.0


def merge_outputs(outs: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One engine pass: its outputs. Several parts: each part's loss as `loss_<part>`, their
    metrics, and `loss`, the sum of this step's part losses (the progress bar's number)."""
    if list(outs) == ["model"]:
        return outs["model"]
    merged: dict[str, torch.Tensor] = {}
    for part, out in outs.items():
        merged.update({k: v for k, v in out.items() if k != "loss"})
        merged[f"loss_{part}"] = out["loss"].detach()
    merged["loss"] = sum(merged[f"loss_{part}"] for part in outs)
    return merged


def _close(batches: Iterator[Any]) -> None:
    """Stop a loader iterator's data workers now: an exception's traceback would otherwise keep
    them until interpreter exit (where `watchdog.kill_data_workers` is the backstop)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def run(cfg: DictConfig, install_signal_handlers: bool = True,
        on_peer_lost: PeerLostHook | None = None) -> TrainResult:
    """One rank's whole job: process group, trainer, fit. Used by every launch path; any rank's
    failure ends every rank, and a lost one (node down, frozen) calls `on_peer_lost` first
    (`launcher/watchdog.py`)."""
    from sslforge.data_pipeline.stream import start_worker_server
    from sslforge.launcher.env import init_distributed

    if cfg.data.num_workers:
        start_worker_server()  # ready by the time the first loader needs workers
    env = init_distributed(cfg.engine.backend, cfg.engine.collective_timeout_min)
    if install_signal_handlers:
        preemption.install_handlers()
    with watch_peers(env.rank, env.world_size, cfg.engine.peer_timeout_s, on_peer_lost):
        return Trainer(cfg, env).fit()


__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "run"]
