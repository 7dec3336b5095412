"""XMC-GAN: its losses against computations written here pair by pair, their distributed
versions (2 ranks with B/2 = 1 process with B), the networks' shapes, and the method's parts:
which part each loss reaches, the critic's spectral norm in the generator's pass, the EMA."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sslforge import distributed
from sslforge.config import ConfigError, load_config
from sslforge.losses.xmc_contrastive import hinge_d_loss, hinge_g_loss, pair_contrastive_loss, word_region_loss
from sslforge.models.text import SmallTextEncoder
from sslforge.models.xmcgan import Discriminator, Generator, spectral_norm_buffers
from tests.dist_harness import run_ranks

TAU = 0.1
GAMMAS = (5.0, 5.0, 50.0)


# ----------------------------------------------------------------------------- references

def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _cross_entropy_of_row(row: list[torch.Tensor], own: int) -> torch.Tensor:
    return -(row[own] - torch.log(sum(torch.exp(x) for x in row)))


def reference_pair_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over i of -log softmax_j(cos(a_i, b_j) / tau)[i], plus the same from b to a."""
    n = len(a)
    a_to_b = sum(_cross_entropy_of_row([_cos(a[i], b[j]) / tau for j in range(n)], i) for i in range(n)) / n
    b_to_a = sum(_cross_entropy_of_row([_cos(b[i], a[j]) / tau for j in range(n)], i) for i in range(n)) / n
    return a_to_b + b_to_a


def reference_match_score(words: torch.Tensor, mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """One caption (L, d) against one image (R, d), as AttnGAN's DAMSM: each valid word's context
    is the softmax-over-regions (gamma1 cos) mix of the normalised regions; the score is
    (gamma3 / gamma2) log sum_words exp(gamma2 cos(word, context))."""
    g1, g2, g3 = GAMMAS
    unit = [r / r.norm() for r in regions]
    terms = []
    for word, valid in zip(words, mask):
        if not valid:
            continue
        weights = torch.softmax(torch.stack([g1 * _cos(r, word) for r in regions]), dim=0)
        context = sum(w * r for w, r in zip(weights, unit))
        terms.append(torch.exp(g2 * _cos(word, context)))
    return g3 / g2 * torch.log(sum(terms))


def reference_word_loss(regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = len(regions)
    score = [[reference_match_score(words[i], mask[i], regions[j]) for j in range(n)] for i in range(n)]
    image_to_text = sum(_cross_entropy_of_row([score[i][j] for i in range(n)], j) for j in range(n)) / n
    text_to_image = sum(_cross_entropy_of_row(score[i], i) for i in range(n)) / n
    return image_to_text + text_to_image


def _inputs(batch: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Matching features of `batch` pairs: images, sentences, region and word features, masks
    of 1..4 valid words out of 5 (padding words random, so only the mask hides them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 4, 2, 5, 3, 4, 2, 1][:batch])
    return {"image": torch.randn(batch, 4, generator=g, dtype=torch.float64),
            "other": torch.randn(batch, 4, generator=g, dtype=torch.float64),
            "regions": torch.randn(batch, 6, 3, generator=g, dtype=torch.float64),
            "words": torch.randn(batch, 5, 3, generator=g, dtype=torch.float64),
            "mask": torch.arange(5)[None, :] < lengths[:, None]}


def _losses(x: dict[str, torch.Tensor], gather: bool) -> dict[str, torch.Tensor]:
    return {"sentence": pair_contrastive_loss(x["image"], x["other"], TAU, gather),
            "image": pair_contrastive_loss(x["other"], x["image"], TAU, gather),
            "word": word_region_loss(x["regions"], x["words"], x["mask"], *GAMMAS, gather=gather)}


# ------------------------------------------------------------------------- the losses

def test_pair_loss_is_both_directions_of_the_pairwise_cross_entropy() -> None:
    x = _inputs()
    expected = reference_pair_loss(x["image"], x["other"], TAU)
    assert torch.allclose(pair_contrastive_loss(x["image"], x["other"], TAU).double(), expected, atol=1e-5)


def test_word_region_loss_matches_the_word_by_word_computation() -> None:
    x = _inputs()
    expected = reference_word_loss(x["regions"], x["words"], x["mask"])
    got = word_region_loss(x["regions"], x["words"], x["mask"], *GAMMAS)
    assert torch.allclose(got.double(), expected, rtol=1e-5)
    shuffled = x["words"].clone()
    shuffled[~x["mask"]] = torch.randn_like(shuffled[~x["mask"]])  # padding never counts
    assert torch.allclose(word_region_loss(x["regions"], shuffled, x["mask"], *GAMMAS), got, atol=1e-5)


def test_hinge_losses() -> None:
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.3, 1.5])
    expected_d = (0.5 + 0.0 + 2.0) / 3 + (0.0 + 1.3 + 2.5) / 3
    assert math.isclose(hinge_d_loss(real, fake).item(), expected_d, rel_tol=1e-6)
    assert math.isclose(hinge_g_loss(fake).item(), -(-2.0 + 0.3 + 1.5) / 3, rel_tol=1e-6)


def _losses_on_my_half(batch: int) -> dict[str, Any]:
    """This rank's half of the global inputs: the gathered losses with their input gradients,
    and the local-batch losses."""
    x = _inputs(batch)
    half = batch // distributed.world_size()
    mine = {k: v[distributed.rank() * half:(distributed.rank() + 1) * half].clone() for k, v in x.items()}
    for key in ("image", "other", "regions", "words"):
        mine[key].requires_grad_(True)
    out: dict[str, Any] = {}
    for name, loss in _losses(mine, gather=True).items():
        grads = torch.autograd.grad(loss, [mine[k] for k in ("image", "other", "regions", "words")],
                                    allow_unused=True)
        out[name] = (loss.detach(), [g if g is None else g.detach() for g in grads])
    out["local"] = {k: v.detach() for k, v in _losses(mine, gather=False).items()}
    return out


def test_gathered_losses_on_two_ranks_equal_one_process_and_local_ones_use_the_rank_batch() -> None:
    batch = 8
    pair = run_ranks(_losses_on_my_half, 2, batch)
    whole = _inputs(batch)
    for key in ("image", "other", "regions", "words"):
        whole[key].requires_grad_(True)
    single = _losses(whole, gather=True)
    for name, loss in single.items():
        grads = torch.autograd.grad(loss, [whole[k] for k in ("image", "other", "regions", "words")],
                                    allow_unused=True)
        assert torch.allclose((pair[0][name][0] + pair[1][name][0]) / 2, loss.float(), atol=1e-5), name
        for i, grad in enumerate(grads):
            if grad is None:
                assert pair[0][name][1][i] is None, name
                continue
            # each rank backpropagates its own loss; the trainer averages over ranks
            together = torch.cat([pair[0][name][1][i], pair[1][name][1][i]]) / 2
            assert torch.allclose(together.double(), grad, atol=1e-6), (name, i)
            assert grad.abs().sum() > 0
    for rank, result in enumerate(pair):
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in _inputs(batch).items()}
        assert torch.allclose(result["local"]["word"].double(),
                              reference_word_loss(half["regions"], half["words"], half["mask"]), rtol=1e-5)
        assert torch.allclose(result["local"]["sentence"].double(),
                              reference_pair_loss(half["image"], half["other"], TAU), atol=1e-5)


# ------------------------------------------------------------------------- the networks

@pytest.mark.parametrize("size, regions", [(32, 8 * 8), (128, 16 * 16)])
def test_generator_and_critic_shapes(size: int, regions: int) -> None:
    torch.manual_seed(0)
    g, d = Generator(size, text_dim=8, z_dim=4, gf_dim=2), Discriminator(size, text_dim=8, df_dim=2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    images = g(torch.randn(2, 4), torch.randn(2, 8), torch.randn(2, 3, 8), mask)
    assert images.shape == (2, 3, size, size) and 0 <= images.min() and images.max() <= 1
    out = d(torch.cat([images, images]), torch.randn(2, 8))
    assert out.logits.shape == (4,) and out.regions.shape == (4, regions, 8)
    assert out.pooled.shape == (4, d.feature_dim) and out.sentence.shape == (2, d.feature_dim)
    assert not spectral_norm_buffers(g) and len(spectral_norm_buffers(d)) == 2 * sum(
        1 for _ in d.modules() if hasattr(_, "parametrizations"))


# ------------------------------------------------------------------------- the method

TINY = ["data.train=unused", "data.image_size=16", "method.gf_dim=2", "method.df_dim=2", "method.z_dim=4",
        "method.text_dim=8", "method.word_dim=4", "logging.wandb_mode=disabled"]


@pytest.fixture
def gan(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A tiny XMC-GAN with a small text encoder of 50 words trained with the critic."""
    from sslforge.methods import build_method, xmcgan

    monkeypatch.setattr(xmcgan, "build_text_side", lambda cfg: SmallTextEncoder(50, 8, 4))
    torch.manual_seed(0)
    return build_method(load_config("xmcgan_synth", TINY)).train()


def _batch(b: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    mask = torch.arange(5)[None, :] < torch.tensor([2, 5, 1, 3])[:b, None]
    return {"views": [torch.randn(b, 3, 16, 16, generator=g)], "index": torch.arange(b),
            "text_ids": torch.randint(1, 50, (b, 5), generator=g) * mask, "text_mask": mask}


def _grads(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_each_part_loss_reaches_its_own_part_only(gan: Any) -> None:
    gan.updating = ("discriminator", "generator")
    gan.part_step("discriminator", _batch(), 1)["loss"].backward()
    assert all(p.grad is None for p in gan.generator.parameters())
    assert all(_grads(gan.discriminator.blocks)) and any(_grads(gan.text_encoder))  # D and its text encoder
    gan.zero_grad(set_to_none=True)
    gan.part_step("generator", _batch(), 1)["loss"].backward()
    assert all(p.grad is None for p in gan.discriminator.parameters())
    assert all(p.grad is None for p in gan.text_encoder.parameters())
    assert any(_grads(gan.generator))


def test_the_generator_pass_sees_the_critic_weights_of_the_critic_pass(gan: Any) -> None:
    seen: list[Any] = []
    gan.discriminator.register_forward_hook(lambda module, args, out: seen.append(out))
    gan.updating = ("discriminator", "generator")
    vectors = [v.clone() for v in spectral_norm_buffers(gan.discriminator)]
    gan.part_step("discriminator", _batch(), 1)
    advanced = [v.clone() for v in spectral_norm_buffers(gan.discriminator)]
    assert any(not torch.equal(a, b) for a, b in zip(vectors, advanced))  # one power iteration
    gan.part_step("generator", _batch(), 1)
    assert all(torch.equal(a, b) for a, b in zip(advanced, spectral_norm_buffers(gan.discriminator)))
    critic_pass, generator_pass = seen
    assert torch.equal(generator_pass.logits, critic_pass.logits[4:])  # the fakes, scored alike
    assert torch.equal(generator_pass.regions, critic_pass.regions[4:])
    assert gan.discriminator.training  # back in training mode


def test_noise_depends_on_the_sample_not_on_its_place_in_the_batch(gan: Any) -> None:
    batch = _batch()
    reordered = {k: (v[[2, 0, 3, 1]] if torch.is_tensor(v) else [v[0][[2, 0, 3, 1]]]) for k, v in batch.items()}
    text = gan.text_encoder(batch["text_ids"], batch["text_mask"])
    with torch.no_grad():
        gan.generator.eval()
        a = gan.fakes(batch, 5, text, batch["text_mask"])
        words, sentence = gan.text_encoder(reordered["text_ids"], reordered["text_mask"])
        b = gan.fakes(reordered, 5, type(text)(words, sentence), reordered["text_mask"])
    assert torch.allclose(a[[2, 0, 3, 1]], b, atol=1e-6)


def test_ema_generator_follows_after_generator_updates_only(gan: Any) -> None:
    before = [p.clone() for p in gan.ema_generator.parameters()]
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.add_(1.0)
    gan.updating = ("discriminator",)
    gan.on_after_optimizer_step(0, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, gan.ema_generator.parameters()))
    gan.updating = ("discriminator", "generator")
    gan.on_after_optimizer_step(1, 10)
    m = gan.cfg.method.ema_momentum
    for old, new, online in zip(before, gan.ema_generator.parameters(), gan.generator.parameters()):
        assert torch.allclose(new, m * old + (1 - m) * online, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(gan.ema_generator.buffers(), gan.generator.buffers()))


def test_missing_files_fail_at_config_time_naming_them(tmp_path: Path) -> None:
    missing = tmp_path / "resnet50.pth"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config("xmcgan_synth", [*TINY, f"method.pretrained_image_encoder={missing}"])
    with pytest.raises(ConfigError, match=str(tmp_path / "bert")):
        load_config("xmcgan_synth", [*TINY, f"method.text_encoder=bert:{tmp_path / 'bert'}"])


def test_generated_images_are_in_unit_range_and_sized(gan: Any) -> None:
    batch = _batch()
    images = gan.generate(batch["text_ids"], batch["text_mask"], torch.randn(4, 4))
    assert images.shape == (4, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert gan.ema_generator.training == gan.training  # the mode is restored
    assert F.mse_loss(images[0], images[1]) > 0


SMALL_STEP = ("optim.name=sgd", "optim.parts.generator.every=1", "method.gf_dim=2", "method.df_dim=2",
              "method.z_dim=4", "method.text_dim=8", "method.word_dim=4")  # SGD: see test_trainer_equivalence


def test_a_trainer_step_of_both_parts_on_two_ranks_equals_one(tmp_path: Path) -> None:
    """One real step (both parts' engines, the generator's global batch norm, gathered negatives,
    noise keyed by sample) on 2 ranks with B/2 gives 1 rank's loss, gradients and parameters."""
    from tests.trainer_fixtures import assert_two_ranks_equal_one, one_step_of

    (single,) = run_ranks(one_step_of, 1, str(tmp_path / "one"), "xmcgan_synth", *SMALL_STEP)
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), "xmcgan_synth", *SMALL_STEP)
    assert_two_ranks_equal_one(single, pair, atol=1e-4)  # float32 rounding of gradients up to ~50
    assert {"loss_discriminator", "loss_generator"} <= set(single["metrics"])
    assert any(name.startswith("generator.") and g.abs().sum() > 0 for name, g in single["grads"].items())
