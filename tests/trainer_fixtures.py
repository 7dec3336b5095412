"""Small configs and in-memory batches for trainer tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from sslforge import distributed
from sslforge.config import load_config
from sslforge.launcher.env import init_distributed
from sslforge.methods import method_class
from sslforge.trainer.loop import Trainer

TINY = ["model.backbone=resnet10", "data.image_size=16", "model.proj_hidden_dim=32",
        "model.proj_output_dim=16", "logging.wandb_mode=disabled", "logging.progress=false",
        "data.num_workers=0", "eval.every_epochs=0", "data.val=null"]


def tiny_config(run_dir: Path | str, *overrides: str, recipe: str = "simclr_synth") -> DictConfig:
    return load_config(recipe, [*TINY, f"run_dir={run_dir}", *overrides])


def global_batch(batch_size: int, sizes: Sequence[int] = (16, 16), seed: int = 0) -> dict[str, Any]:
    """Random crops, one (B, 3, s, s) tensor per entry of `sizes` (multi-crop: several sizes);
    labels of 3 classes, so a supervised loss has positives on the same and on other ranks."""
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(batch_size, 3, s, s, generator=g) for s in sizes],
            "label": torch.arange(batch_size) % 3, "index": torch.arange(batch_size), "skipped": 0,
            **captions(batch_size, g)}


def captions(batch_size: int, g: torch.Generator, tokens: int = 6) -> dict[str, Any]:
    """Token ids of random lengths (1..tokens, the rest padding 0) and their captions, for the
    methods that read captions; the others ignore these keys."""
    lengths = torch.randint(1, tokens + 1, (batch_size,), generator=g)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    ids = torch.randint(2, 40, (batch_size, tokens), generator=g) * mask
    return {"text_ids": ids, "text_mask": mask,
            "caption": [" ".join(f"w{int(t)}" for t in row[m]) for row, m in zip(ids, mask)]}


def local_slice(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    b = len(batch["index"]) // world
    part = slice(rank * b, (rank + 1) * b)
    return {"views": [v[part] for v in batch["views"]], "label": batch["label"][part],
            "index": batch["index"][part], "skipped": 0, "text_ids": batch["text_ids"][part],
            "text_mask": batch["text_mask"][part], "caption": batch["caption"][part]}


class FixedLoader:
    """Stands in for ShardLoader: the same batches every epoch."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.skip = skip_batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches[self.skip:])


def view_sizes(cfg: DictConfig) -> list[int]:
    """The crop size of every view the method asks for, in batch order."""
    views = list(cfg.data.views) or method_class(cfg.method.name).views(cfg)
    return [v.size or cfg.data.image_size for v in views for _ in range(v.count)]


def step_trainer(run_dir: str, *overrides: str, batch_size: int = 8, recipe: str = "simclr_synth") -> Trainer:
    """A Trainer for one step on this rank's slice of a fixed global batch (process group up)."""
    cfg = tiny_config(run_dir, f"optim.batch_size={batch_size}", "train.steps=1", *overrides, recipe=recipe)
    env = init_distributed("gloo")
    batch = local_slice(global_batch(batch_size, view_sizes(cfg)), distributed.rank(), env.world_size)
    return Trainer(cfg, env, loader=FixedLoader([batch]))


def one_step(run_dir: str, *overrides: str, batch_size: int = 8, recipe: str = "simclr_synth") -> dict[str, Any]:
    """One real training step (Trainer, DeepSpeed engine) on this rank's slice of a fixed batch.

    Returns the loss (mean over ranks), whether every rank's loss was finite, the gradients
    after backward (absent under ZeRO-2, which frees `p.grad`), every parameter after the
    step and its update (after minus before), the method's buffers after its post-step hook
    (teachers' statistics, queues, centres), its logged scalars (mean over ranks) and its extra
    state (PCL's clusters), so runs on different ranks, ZeRO stages or precisions can be compared.
    """
    trainer = step_trainer(run_dir, *overrides, batch_size=batch_size, recipe=recipe)
    trainer.epoch_start()  # whole-dataset work (PCL's clustering), as `fit` does first
    named = dict(trainer.method.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.begin_step()
    out, finite = trainer.forward_backward(trainer.loader.batches[0])
    grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
    applied = finite and trainer.apply_step()
    params = {n: p.detach().clone() for n, p in named.items()}
    buffers = {n: b.detach().clone() for n, b in trainer.method.named_buffers()}
    loss = distributed.all_reduce_mean(out["loss"].detach()).item()
    metrics = {k: distributed.all_reduce_mean(v.detach().float()).item() for k, v in out.items()
               if k not in ("loss", "embedding") and v.numel() == 1}
    return {"loss": loss, "finite": finite, "applied": applied, "grads": grads, "params": params,
            "buffers": buffers, "update": {n: params[n] - before[n] for n in named}, "metrics": metrics,
            "extra_state": trainer.method.state_dict().get("_extra_state")}


def one_step_of(run_dir: str, recipe: str, *overrides: str) -> dict[str, Any]:
    """`one_step` of a recipe, with the recipe as a positional argument (`run_ranks` passes only those)."""
    return one_step(run_dir, *overrides, recipe=recipe)


def assert_two_ranks_equal_one(single: dict[str, Any], pair: list[dict[str, Any]], atol: float = 1e-5) -> None:
    """The defining property of the distributed methods, on `one_step`'s results: 2 ranks with
    B/2 each give the loss, gradients, updated parameters (teachers and key encoders included)
    and buffers (queues, centres, global BN statistics) of 1 rank with B; both ranks hold the
    same gradients and parameters; and the step did something (a non-zero gradient)."""
    assert single["applied"] and all(rank["applied"] for rank in pair)
    assert abs(pair[0]["loss"] - single["loss"]) < atol
    assert pair[0]["loss"] == pair[1]["loss"]
    for what in ("grads", "params", "buffers"):
        assert_tensors_close(pair[0][what], single[what], what, atol)
    for what in ("grads", "params"):
        for name, value in pair[0][what].items():
            assert torch.equal(pair[1][what][name], value), f"{what} {name} differs between ranks"
    assert any(g.abs().sum() > 0 for g in single["grads"].values())


def assert_tensors_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str,
                         atol: float = 1e-5) -> None:
    """Same names; floating tensors within `atol`, integer ones (queue pointers) equal."""
    assert got.keys() == expected.keys(), what
    for name, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(got[name].float(), value.float(), atol=atol, rtol=0), f"{what} {name}"
        else:
            assert torch.equal(got[name], value), f"{what} {name}"


def losses_by_step(run_dir: Path | str) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the last record of a step wins, as after a resume)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def assert_resumed_losses_equal(whole: Path | str, split: Path | str, steps: int) -> None:
    """A run stopped and resumed (`split`) logged every step 1..steps once, each with the loss of
    the uninterrupted run (`whole`)."""
    expected, resumed = losses_by_step(whole), losses_by_step(split)
    assert sorted(resumed) == list(range(1, steps + 1))  # no step lost or repeated
    for step in range(1, steps + 1):
        assert abs(resumed[step] - expected[step]) <= 1e-6, (step, resumed[step], expected[step])
