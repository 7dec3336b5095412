"""Training-step overhead: sslforge's Trainer step against a bare PyTorch loop doing the same math.

Both run the same SimCLR model (backbone + projector + NT-Xent) with the same LARS update on the
same batch, in one process, interleaved, so the ratio measures what the engine, the schedule,
the finite-loss agreement and the metrics cost. Prints seconds per step and the ratio.
Usage: python benchmarks/bench_train_step.py [--steps 10] [--batch 64] [--image-size 32]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sslforge.config import load_config
from sslforge.launcher.env import init_distributed
from sslforge.losses import nt_xent
from sslforge.methods import build_method
from sslforge.trainer.loop import Trainer, seed_everything
from sslforge.trainer.optim import build_optimizer


class _Repeat:
    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        pass

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([self.batch] * self.n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="resnet10")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = tempfile.mkdtemp(prefix="bench-train-")
    cfg = load_config("simclr_synth", [
        f"run_dir={run_dir}", f"optim.batch_size={args.batch}", f"data.image_size={args.image_size}",
        f"model.backbone={args.backbone}", "logging.wandb_mode=disabled", "logging.progress=false",
        "data.val=null", "eval.every_epochs=0", f"train.steps={10 * args.steps}", "train.log_every_steps=1000000",
        "train.ckpt_every_steps=1000000"])
    env = init_distributed("gloo")
    g = torch.Generator().manual_seed(0)
    batch = {"views": [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g) for _ in range(2)],
             "skipped": 0}
    trainer = Trainer(cfg, env, loader=_Repeat(batch, 10 * args.steps))

    seed_everything(0)
    bare = build_method(cfg)
    opt = build_optimizer(bare, bare.param_groups(), cfg, lr=0.1)

    def bare_step() -> None:
        x1, x2 = batch["views"]
        z1, z2 = bare.projector(bare.backbone(torch.cat([x1, x2]))).chunk(2)
        loss = nt_xent(z1, z2, cfg.method.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    def engine_step() -> None:
        trainer._step(batch)
        trainer.pos.step += 1

    timings = {"sslforge": 0.0, "bare": 0.0}
    for fn in (bare_step, engine_step):  # warm-up
        fn()
    for _ in range(args.steps):
        for name, fn in (("bare", bare_step), ("sslforge", engine_step)):
            t0 = time.perf_counter()
            fn()
            timings[name] += time.perf_counter() - t0
    per = {k: v / args.steps for k, v in timings.items()}
    print(f"train step, {args.backbone} @ {args.image_size}px, batch {args.batch} x 2 views, CPU, 1 thread")
    print(f"  bare PyTorch loop : {per['bare'] * 1000:8.1f} ms/step")
    print(f"  sslforge Trainer  : {per['sslforge'] * 1000:8.1f} ms/step")
    print(f"  ratio sslforge/bare: {per['sslforge'] / per['bare']:.3f}")


if __name__ == "__main__":
    main()
