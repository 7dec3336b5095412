"""Methods with several optimised parts (`PartsMethod`, trainer/parts.py), on a toy GAN:
the update ratio, each part's own optimiser and schedule, the cross-part gradient guard, and a
resume that continues exactly (both optimisers' states, the EMA generator, the ratio's phase)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge.config import ConfigError, ViewConfig, load_config
from sslforge.launcher.env import init_distributed
from sslforge.methods import METHODS
from sslforge.methods.base import PartsMethod
from sslforge.models.ema import ema_update_, frozen, momentum_copy
from sslforge.trainer.loop import Trainer
from sslforge.trainer.parts import CrossPartGradientError, updating_parts
from tests.trainer_fixtures import FixedLoader

EMA = 0.9


class ToyGAN(PartsMethod):
    """A linear generator and critic: D's hinge loss on real and detached fakes, G's loss
    through a frozen D, an EMA generator updated after each generator step."""

    part_names = ("discriminator", "generator")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.generator = nn.Sequential(nn.Linear(4, 12), nn.BatchNorm1d(12))
        self.discriminator = nn.Linear(12, 1)
        self.ema_generator = momentum_copy(self.generator)
        self.freeze_critic = True  # False: G's loss reaches D's parameters (the guard must stop it)

    @classmethod
    def views(cls, cfg: Any) -> list[ViewConfig]:
        return [ViewConfig(scale=[1.0, 1.0], flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)]

    def part_modules(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator, "generator": self.generator}

    def part_step(self, part: str, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if part == "discriminator":
            z = torch.randn(len(batch["index"]), 4, generator=torch.Generator().manual_seed(step))
            with torch.set_grad_enabled("generator" in self.updating):
                self.fake = self.generator(z)
            real = batch["views"][0].flatten(1)[:, :12]
            d_loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(self.fake.detach())).mean()
            return {"loss": d_loss}
        if self.freeze_critic:
            with frozen(self.discriminator):
                return {"loss": -self.discriminator(self.fake).mean()}
        return {"loss": -self.discriminator(self.fake).mean()}

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        if "generator" in self.updating:
            ema_update_(self.ema_generator, self.generator, EMA, buffers=True)

    def fp32_modules(self) -> list[nn.Module]:
        return [self.ema_generator]

    def encoder(self) -> nn.Module:
        return self.discriminator


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy method is known only inside this module's tests (others iterate the registry)."""
    monkeypatch.setitem(METHODS, "toy_gan", ToyGAN)

RECIPE = """
name: toy_gan
method: {name: toy_gan}
data: {train: unused, image_size: 8, num_workers: 0, val: null}
model: {backbone: resnet10}
optim:
  name: adamw
  batch_size: 4
  lr_scaling: none
  lr_schedule: constant
  warmup_epochs: 0
  weight_decay: 0.0
  betas: [0.5, 0.999]
  parts:
    discriminator: {base_lr: 4.0e-4, every: 1}
    generator: {base_lr: 1.0e-4, every: 2}
train: {epochs: 1, ckpt_every_steps: 1000}
eval: {every_epochs: 0}
logging: {wandb_mode: disabled, progress: false}
"""


def _recipe(tmp: Path) -> str:
    path = tmp / "toy_gan.yaml"
    path.write_text(RECIPE)
    return str(path)


def _batches(n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    return [{"views": [torch.randn(4, 3, 8, 8, generator=g) + 1.0], "index": torch.arange(4) + 4 * i,
             "label": torch.zeros(4, dtype=torch.long), "skipped": 0} for i in range(n)]


def _trainer(tmp: Path, run: str, *overrides: str, steps: int = 6) -> Trainer:
    cfg = load_config(_recipe(tmp), [f"run_dir={tmp / run}", *overrides])
    return Trainer(cfg, init_distributed("gloo"), loader=FixedLoader(_batches(steps)))


def _adam_steps(trainer: Trainer) -> dict[str, int]:
    return {name: int(next(iter(engine.optimizer.state.values()))["step"])
            for name, engine in trainer.engines.engines.items()}


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, and each part's Adam moments, by name."""
    out = {f"method.{k}": v.detach().clone() for k, v in trainer.method.state_dict().items()}
    for name, engine in trainer.engines.engines.items():
        for i, state in enumerate(engine.optimizer.state.values()):
            out.update({f"{name}.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()})
    return out


def test_update_ratio_and_each_part_has_its_own_lr(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "ratio")
    assert [updating_parts(trainer.cfg, ToyGAN.part_names, t) for t in range(4)] == [
        ("discriminator",), ("discriminator", "generator")] * 2
    ema_before = [p.clone() for p in trainer.method.ema_generator.parameters()]
    trainer.fit()
    assert _adam_steps(trainer) == {"discriminator": 6, "generator": 3}
    lrs = {name: {g["lr"] for g in engine.optimizer.param_groups} for name, engine in trainer.engines.engines.items()}
    assert lrs == {"discriminator": {4e-4}, "generator": {1e-4}}
    betas = {g["betas"] for e in trainer.engines.engines.values() for g in e.optimizer.param_groups}
    assert betas == {(0.5, 0.999)}
    assert all(not torch.equal(a, b) for a, b in zip(ema_before, trainer.method.ema_generator.parameters()))
    logged = [line for line in (tmp_path / "ratio" / "metrics.jsonl").read_text().splitlines() if "loss_" in line]
    assert any("loss_generator" in line for line in logged) and all("loss_discriminator" in line for line in logged)


def test_generator_and_critic_steps_match_plain_adam(tmp_path: Path) -> None:
    """Two steps by hand with torch.optim.Adam per part, the same losses: the trainer's parts
    move exactly as two independent optimisers (D at step 0 and 1, G only at step 1)."""
    trainer = _trainer(tmp_path, "hand", steps=2)
    method = trainer.method
    ref = ToyGAN(trainer.cfg)
    ref.load_state_dict(method.state_dict())
    opt_d = torch.optim.AdamW(ref.discriminator.parameters(), lr=4e-4, betas=(0.5, 0.999), weight_decay=0.0)
    opt_g = torch.optim.AdamW(ref.generator.parameters(), lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0)
    for step, batch in enumerate(_batches(2)):
        ref.updating = ("discriminator",) if step == 0 else ("discriminator", "generator")
        opt_d.zero_grad()
        opt_g.zero_grad()
        ref.part_step("discriminator", batch, step)["loss"].backward()
        if step == 1:
            ref.part_step("generator", batch, step)["loss"].backward()
            opt_g.step()
        opt_d.step()
        ref.on_after_optimizer_step(step, 2)
    trainer.fit()
    for (name, a), b in zip(method.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = _trainer(tmp_path, "straight")
    straight.fit()
    first = _trainer(tmp_path, "resumed")
    assert first.fit(stop_at_step=3).preempted  # stops after a D-only step: G's phase must survive
    second = _trainer(tmp_path, "resumed")
    assert second.pos.step == 3
    second.fit()
    a, b = _state(straight), _state(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _adam_steps(second) == {"discriminator": 6, "generator": 3}
    saved = tmp_path / "resumed" / "checkpoints" / "step_00000003"
    assert {p.name for p in saved.iterdir() if p.is_dir()} == {"discriminator", "generator"}


def test_a_loss_reaching_another_part_stops_the_run(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "leak", steps=2)
    trainer.method.freeze_critic = False
    with pytest.raises(CrossPartGradientError, match=r"generator's loss gave a gradient to the discriminator's parameter '(weight|bias)'"):
        trainer.fit()


@pytest.mark.parametrize("override, message", [
    ("optim.parts.critic.every=1", r"unknown \['critic'\]"),
    ("optim.parts.discriminator.every=2", "some part must update at every step"),
    ("optim.parts.generator.name=rmsprop", r"optim.parts.generator.name"),
])
def test_parts_config_is_checked_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_recipe(tmp_path), [override])


def test_a_part_without_settings_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "no_generator.yaml"
    recipe.write_text(RECIPE.replace("    generator: {base_lr: 1.0e-4, every: 2}\n", ""))
    with pytest.raises(ConfigError, match=r"missing \['generator'\]"):
        load_config(str(recipe), [])


def test_one_optimiser_methods_refuse_parts() -> None:
    with pytest.raises(ConfigError, match="optim.parts is for methods with several optimised parts"):
        load_config("simclr_synth", ["optim.parts.x.every=1"])


def test_zero_stages_step_the_parts_alike(tmp_path: Path) -> None:
    """Each part's engine under ZeRO 1 and 2 (flattened, partitioned optimiser state) moves the
    parts as under stage 0, and resumes (the parts' ZeRO files in their sub-directories)."""
    plain = _trainer(tmp_path, "zero0", steps=4)
    plain.fit()
    for stage in (1, 2):
        run = f"zero{stage}"
        _trainer(tmp_path, run, f"engine.zero_stage={stage}", steps=4).fit(stop_at_step=1)
        resumed = _trainer(tmp_path, run, f"engine.zero_stage={stage}", steps=4)
        assert {e.zero_optimization_stage() for e in resumed.engines.engines.values()} == {stage}
        resumed.fit()
        for (name, a), b in zip(plain.method.state_dict().items(), resumed.method.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"stage {stage}: {name}")


def test_bf16_autocast_reaches_every_part(tmp_path: Path) -> None:
    """Each part's forward runs under its engine's autocast (the engines report it), and the
    critic's matmuls are bf16 there while the weights stay float32."""
    trainer = _trainer(tmp_path, "bf16", "engine.precision=bf16", steps=2)
    seen: list[torch.dtype] = []
    trainer.method.discriminator.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    trainer.fit()
    assert all(e.torch_autocast_enabled() for e in trainer.engines.engines.values())
    assert set(seen) == {torch.bfloat16}
    assert {p.dtype for p in trainer.method.parameters()} == {torch.float32}
