"""The convolutional VAE: its ELBO terms against independent formulas and torch.distributions,
the reduction's declared factor, finite losses for extreme log-variances, float32 KL under bf16,
the pixels it trains on, 2 ranks with B/2 each equal to 1 rank with B (one step, both
reductions, and the evaluation's ELBO over data.val), and the evaluation's image grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.distributions import Normal, kl_divergence

from sslforge.config import ConfigError
from sslforge.data_pipeline.views import build_view_transform
from sslforge.eval.image_grid import PAD, save_image_grid
from sslforge.launcher.env import DistEnv
from sslforge.losses.elbo import (LOGVAR_MAX, LOGVAR_MIN, bernoulli_log_likelihood, gaussian_kl,
                                  gaussian_log_likelihood, indexed_normal, negative_elbo, reparameterise)
from sslforge.methods.base import EvalContext
from sslforge.methods.vae import VAE
from sslforge.data_pipeline.views import model_input, unit_pixels
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import global_batch, one_step_of, tiny_config

RECIPE = "vae_synth"
# A few hundred parameters at 16 px: two stride-2 levels (16 -> 4), a 4-d latent; SGD (Adam's
# first step is sign(g), which turns rounding in near-zero gradients into differences of size lr).
TINY_VAE = ["method.hidden_dims=[4,8]", "method.latent_dim=4", "method.grid_images=6", "optim.name=sgd",
            "optim.base_lr=1e-4", "optim.warmup_epochs=0"]
BATCH = 8


def _tiny_vae(tmp_path: Path, *overrides: str) -> VAE:
    torch.manual_seed(0)
    return VAE(tiny_config(tmp_path, *TINY_VAE, *overrides, recipe=RECIPE))


# ------------------------------------------------------------------------------------ the terms
def test_kl_equals_closed_form_and_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=g), 2 * torch.randn(5, 7, generator=g)
    m, lv = mu.double().numpy(), logvar.double().numpy()
    by_hand = 0.5 * (np.exp(lv) + m ** 2 - 1 - lv).sum(axis=1)  # KL(N(m, s^2) || N(0, 1)), summed over dims
    torch_kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=1)
    kl = gaussian_kl(mu, logvar)
    assert kl.shape == (5,)
    assert np.allclose(kl.numpy(), by_hand, rtol=1e-5, atol=1e-5)
    assert torch.allclose(kl, torch_kl, rtol=1e-5, atol=1e-5)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))  # q = p


def test_reparameterised_samples_have_mean_mu_and_std_exp_half_logvar() -> None:
    n = 20000
    mu, logvar = torch.tensor([-1.5, 0.0, 2.0]), torch.tensor([-2.0, 0.0, 1.4])
    eps = indexed_normal(torch.arange(n), 3, 0, 0)
    z = reparameterise(mu.expand(n, 3), logvar.expand(n, 3), eps)
    std = torch.exp(0.5 * logvar)
    assert torch.all((z.mean(0) - mu).abs() < 5 * std / math.sqrt(n))
    assert torch.allclose(z.std(0), std, rtol=0.03)
    mu.requires_grad_(True)  # differentiable in mu: dz/dmu = 1
    reparameterise(mu.expand(4, 3), logvar.expand(4, 3), eps[:4]).sum().backward()
    assert torch.equal(mu.grad, torch.full((3,), 4.0))


def test_noise_is_keyed_by_sample_index_not_by_batch_split() -> None:
    whole = indexed_normal(torch.arange(8), 5, 3, 7)
    halves = torch.cat([indexed_normal(torch.arange(4), 5, 3, 7), indexed_normal(torch.arange(4, 8), 5, 3, 7)])
    assert torch.equal(whole, halves)
    assert torch.equal(indexed_normal(torch.tensor([6, 2]), 5, 3, 7), whole[[6, 2]])
    assert not torch.equal(indexed_normal(torch.arange(8), 5, 3, 8), whole)  # another step, other noise
    assert len(torch.unique(whole[:, 0])) == 8


def test_sum_and_mean_reductions_differ_exactly_by_the_batch_size(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    log_likelihood, kl = -100 * torch.rand(BATCH, generator=g), torch.rand(BATCH, generator=g)
    total = negative_elbo(log_likelihood, kl, 2.0, "sum")
    assert torch.isclose(total, (2.0 * kl - log_likelihood).double().sum().float())
    assert torch.equal(total, BATCH * negative_elbo(log_likelihood, kl, 2.0, "mean"))
    # through the method: one training step's loss on the same batch, weights and noise
    batch = global_batch(BATCH, [16])
    losses = {r: _tiny_vae(tmp_path, f"method.reduction={r}").training_step(batch, 0)["loss"] for r in ("sum", "mean")}
    assert losses["sum"] > 1000 and torch.equal(losses["sum"], BATCH * losses["mean"])
    with pytest.raises(ValueError, match="reduction must be one of sum, mean"):
        negative_elbo(log_likelihood, kl, 1.0, "batchmean")


def test_bernoulli_and_gaussian_log_likelihoods_match_torch() -> None:
    g = torch.Generator().manual_seed(2)
    logits, x = 3 * torch.randn(4, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(dim=(1, 2, 3))
    assert torch.allclose(bernoulli_log_likelihood(logits, x), -bce, rtol=1e-5)
    assert torch.isclose(bernoulli_log_likelihood(logits, x).sum(),
                         -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum"), rtol=1e-5)
    mean, logvar = torch.sigmoid(logits), torch.tensor([-3.0])
    expected = Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(dim=(1, 2, 3))
    assert torch.allclose(gaussian_log_likelihood(mean, x, logvar), expected, rtol=1e-5)


def test_clamped_logvar_keeps_the_loss_and_its_gradient_finite() -> None:
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.tensor([[1e4, -1e4, 90.0], [-200.0, 0.0, 1e4]], requires_grad=True)
    naive = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)  # what the clamp prevents
    assert not torch.isfinite(naive).all()
    kl = gaussian_kl(mu, logvar)
    z = reparameterise(mu, logvar, torch.ones(2, 3))
    x = torch.rand(2, 3, 4, 4)
    recon = gaussian_log_likelihood(torch.full_like(x, 0.5), x, torch.tensor([-1e4]))
    loss = negative_elbo(recon, kl, 1.0, "sum") + z.sum()
    loss.backward()
    assert torch.isfinite(kl).all() and torch.isfinite(z).all() and torch.isfinite(loss)
    assert torch.isfinite(logvar.grad).all() and torch.isfinite(mu.grad).all()
    assert float(z.detach().max()) == pytest.approx(math.exp(LOGVAR_MAX / 2), rel=1e-6)  # std at the upper bound
    per_dim = lambda lv: 0.5 * (math.exp(lv) - 1 - lv)  # KL of one dimension with mu = 0
    assert float(kl[0].detach()) == pytest.approx(2 * per_dim(LOGVAR_MAX) + per_dim(LOGVAR_MIN), rel=1e-5)


def test_kl_and_reparameterisation_stay_float32_under_bf16_autocast() -> None:
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 6)
    h = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = head(h).chunk(2, dim=1)
        assert mu.dtype == torch.bfloat16  # the network computes in bf16 ...
        kl = gaussian_kl(mu, logvar)
        z = reparameterise(mu, logvar, torch.randn(4, 3))
    assert kl.dtype == z.dtype == torch.float32  # ... the KL and exp(logvar) in float32
    assert torch.equal(kl, gaussian_kl(mu.float(), logvar.float()))


# ------------------------------------------------------------------------ the method's pieces
def test_the_view_undone_gives_the_image_pixels_and_the_encoder_takes_normalised_images(tmp_path: Path) -> None:
    vae = _tiny_vae(tmp_path)
    (view,) = VAE.views(vae.cfg)
    assert (view.scale, view.jitter_p, view.blur_p, view.grayscale_p) == ([1.0, 1.0], 0.0, 0.0, 0.0)
    view.flip_p = 0.0  # so the crop is the image itself
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    crop = model_input(torch.stack(build_view_transform([view])(image)))[0]  # as the trainer hands it over
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(unit_pixels(crop[None])[0], pixels, atol=1e-6)
    vae.eval()
    with torch.no_grad():
        assert torch.equal(vae.encoder()(crop[None]), vae.encoder_net(unit_pixels(crop[None]))[0])


def test_gaussian_variance_is_learned_or_fixed(tmp_path: Path) -> None:
    batch = global_batch(BATCH, [16])
    learned = _tiny_vae(tmp_path, "method.likelihood=gaussian", "method.gaussian_logvar=-2")
    learned.training_step(batch, 0)["loss"].backward()
    assert learned.decoder_logvar.grad is not None and float(learned.decoder_logvar.grad.abs()) > 0
    fixed = _tiny_vae(tmp_path, "method.likelihood=gaussian", "method.gaussian_variance=fixed")
    assert "decoder_logvar" in dict(fixed.named_buffers()) and "decoder_logvar" not in dict(fixed.named_parameters())


@pytest.mark.parametrize("override, message", [
    ("data.image_size=18", "data.image_size=18 must be a positive multiple of 4"),
    ("method.likelihood=laplace", "method.likelihood='laplace' is not one of bernoulli, gaussian"),
    ("method.reduction=batchmean", "method.reduction='batchmean' is not one of sum, mean"),
])
def test_bad_settings_fail_at_load_naming_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *TINY_VAE, override, recipe=RECIPE)


# -------------------------------------------------------------------- distributed and evaluation
def _steps_and_evaluation(run_dir: str, val: str) -> dict[str, Any]:
    """On this rank: one trainer step with each reduction, then the evaluation of a freshly
    seeded model over `val` (rank 0 writes the grids)."""
    out = {r: one_step_of(f"{run_dir}/{r}", RECIPE, *TINY_VAE, f"method.reduction={r}") for r in ("sum", "mean")}
    from sslforge import distributed

    torch.manual_seed(0)
    vae = VAE(tiny_config(run_dir, *TINY_VAE, f"data.val={val}", "eval.batch_size=50", recipe=RECIPE))
    env = DistEnv(distributed.rank(), distributed.world_size(), 0, torch.device("cpu"), "gloo")
    images = Path(run_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    logged: list[tuple[str, Path]] = []
    out["eval"] = vae.evaluate(EvalContext(vae.cfg, env, 5, 1, 5, images, lambda name, path: logged.append((name, path))))
    out["logged"] = logged
    return out


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Within float32 rounding of the largest value: a summed ELBO's gradients are in the
    hundreds, and summing them in another order moves the small ones by ~1e-7 of that."""
    assert got.keys() == expected.keys(), what
    scale = max(float(v.abs().max()) for v in expected.values())
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-6 * scale), f"{what} {name}"


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory: pytest.TempPathFactory, synth_data: dict) -> tuple[dict, list[dict]]:
    root = tmp_path_factory.mktemp("vae_ranks")
    (single,) = run_ranks(_steps_and_evaluation, 1, str(root / "one"), synth_data["val"])
    pair = run_ranks(_steps_and_evaluation, 2, str(root / "two"), synth_data["val"])
    return single, pair


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_step_on_two_ranks_equals_one_rank(one_and_two_ranks: tuple[dict, list[dict]], reduction: str) -> None:
    single, pair = (one_and_two_ranks[0][reduction], [rank[reduction] for rank in one_and_two_ranks[1]])
    assert single["applied"] and all(rank["applied"] for rank in pair)
    assert pair[0]["loss"] == pytest.approx(single["loss"], rel=1e-6)  # the global batch's sum or mean
    for what in ("grads", "params", "buffers"):  # buffers: batch-norm statistics over the global batch
        _assert_close(pair[0][what], single[what], what)
    for what in ("grads", "params"):
        for name, value in pair[0][what].items():
            assert torch.equal(pair[1][what][name], value), f"{what} {name} differs between ranks"
    assert any(g.abs().sum() > 0 for g in single["grads"].values())
    if reduction == "sum":
        mean = one_and_two_ranks[0]["mean"]
        assert single["loss"] == pytest.approx(BATCH * mean["loss"], rel=1e-6)
        for name, grad in single["grads"].items():
            assert torch.allclose(grad, BATCH * mean["grads"][name], rtol=1e-4, atol=1e-6), name


def test_evaluation_is_the_same_on_two_ranks_and_writes_both_grids(one_and_two_ranks: tuple[dict, list[dict]]) -> None:
    single, pair = one_and_two_ranks
    result = single["eval"]
    assert set(result) == {"val_elbo", "val_bpd"} and math.isfinite(result["val_elbo"]) and result["val_elbo"] < 0
    assert result["val_bpd"] == pytest.approx(-result["val_elbo"] / (3 * 16 * 16 * math.log(2)))
    for rank in pair:  # every val image once over the ranks, the same noise for each wherever it is read
        assert rank["eval"]["val_elbo"] == pytest.approx(result["val_elbo"], rel=1e-6)
    assert [name for name, _ in single["logged"]] == ["val_reconstructions", "prior_samples"]
    assert [name for name, _ in pair[0]["logged"]] == ["val_reconstructions", "prior_samples"] and not pair[1]["logged"]
    recon, samples = (np.asarray(Image.open(path)) for _, path in single["logged"])
    tile = 16 + PAD
    assert recon.shape == (PAD + 2 * tile, PAD + 6 * tile, 3)  # 6 originals over their 6 reconstructions
    assert samples.shape == (PAD + tile, PAD + 6 * tile, 3)


def test_reconstruction_grid_puts_the_val_images_over_their_reconstructions(
        one_and_two_ranks: tuple[dict, list[dict]], synth_data: dict) -> None:
    from sslforge.data_pipeline.eval_stream import eval_batches
    from sslforge.data_pipeline.shards import expand_shards
    from sslforge.eval.classify import split_eval_transform

    first = next(eval_batches(expand_shards(synth_data["val"]), split_eval_transform(16)[0], 6))["image"]
    recon = np.asarray(Image.open(one_and_two_ranks[0]["logged"][0][1]))
    for k in range(6):
        left = PAD + k * (16 + PAD)
        expected = (first[k] * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(recon[PAD:PAD + 16, left:left + 16], expected)


def test_image_grid_checks_its_input_and_draws_titles(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 8, 8)
    path = save_image_grid(images, tmp_path / "sub" / "titled.png", nrow=2, titles=["a red circle", "b", "c"])
    assert Image.open(path).size[0] > 0
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        save_image_grid(images * 2, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="2 titles for 3 images"):
        save_image_grid(images, tmp_path / "bad.png", titles=["a", "b"])
