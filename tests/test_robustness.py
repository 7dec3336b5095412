"""`sslforge eval robustness`: ImageNet-C style corruptions (published formulas, damage growing
with severity, determinism) and the evaluation's numbers on classifiers whose accuracy is known,
on 2 ranks as on 1, with mCE arithmetic, extra sets and a real run end to end."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge.config import save_config
from sslforge.data_pipeline.shards import write_shards
from sslforge.data_pipeline.synth import draw
from sslforge.data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD
from sslforge.eval.corruptions import BENCHMARK, CORRUPTIONS, corrupt, sample_seeds
from sslforge.eval.robustness import (RESULT_FILE, add_normalized_ce, evaluate_robustness, load_baseline,
                                      robustness_from_run, summarize)
from sslforge.launcher.env import DistEnv
from tests.data_helpers import png_bytes, png_colour, write_uneven
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import step_trainer

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
SIZES, CORRUPT = [7, 6], frozenset({3})  # 13 flat-colour samples, label i % 5, sample 3 unreadable
READABLE = [i for i in range(sum(SIZES)) if i not in CORRUPT]


def _photos(count: int = 8, side: int = 64) -> torch.Tensor:
    """Built-in synthetic images (shapes on textured backgrounds), float in [0, 1]."""
    return torch.stack([torch.from_numpy(draw(i % 10, side, np.random.default_rng(i))).permute(2, 0, 1)
                        for i in range(count)]).float() / 255


def _seeds(name: str, severity: int, n: int, seed: int = 0) -> list[int]:
    return sample_seeds(seed, name, severity, torch.arange(n))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((10 * torch.log10(1 / ((a - b) ** 2).mean((1, 2, 3)))).mean())


# ---------------------------------------------------------------- corruptions

@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_keeps_shape_dtype_and_range_and_damages_at_severity_5(name: str) -> None:
    x = _photos(4, 32)
    assert torch.equal(corrupt(x, name, 0, _seeds(name, 0, 4)), x)  # severity 0: the clean image
    out = corrupt(x, name, 5, _seeds(name, 5, 4))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert _psnr(out, x) < 30
    as_uint8 = corrupt((x * 255).round().to(torch.uint8), name, 5, _seeds(name, 5, 4))
    assert as_uint8.dtype == torch.uint8 and as_uint8.shape == x.shape
    assert (as_uint8.float() - (out * 255).round()).abs().max() <= 1  # same image, 8-bit


# Fog, snow and saturate are left out: their published tables do not grow monotonically in
# pixel damage (fog's severities 3 and 4, saturate lowers then raises saturation).
MONOTONE = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
            "motion_blur", "zoom_blur", "brightness", "contrast", "jpeg_compression", "pixelate"]


@pytest.mark.parametrize("name", MONOTONE)
def test_damage_grows_with_severity(name: str) -> None:
    x = _photos(8, 64)
    psnr = [_psnr(corrupt(x, name, s, _seeds(name, s, 8)), x) for s in range(1, 6)]
    assert all(a > b for a, b in zip(psnr, psnr[1:])), psnr


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "snow", "fog"])
def test_random_corruptions_are_fixed_per_sample_seed_whatever_the_batch(name: str) -> None:
    x = _photos(6, 32)
    seeds = _seeds(name, 3, 6)
    whole = corrupt(x, name, 3, seeds)
    assert torch.equal(whole, corrupt(x, name, 3, seeds))
    split = torch.cat([corrupt(x[:2], name, 3, seeds[:2]), corrupt(x[2:], name, 3, seeds[2:])])
    assert torch.allclose(whole, split, atol=1e-6)
    assert not torch.equal(whole, corrupt(x, name, 3, _seeds(name, 3, 6, seed=1)))
    assert sample_seeds(0, name, 3, torch.tensor([4, 5])) == seeds[4:]


def test_gaussian_noise_and_contrast_follow_the_published_formulas() -> None:
    """make_imagenet_c.py: gaussian_noise = clip(x + N(0, c)), c = .38 at severity 5, with the
    sample's own generator; contrast = clip((x - channel mean) * c + mean), c = .05 at 5."""
    x = _photos(3, 32)
    seeds = _seeds("gaussian_noise", 5, 3)
    expected = torch.stack([(xi + 0.38 * torch.randn(xi.shape, generator=torch.Generator().manual_seed(s))).clamp(0, 1)
                            for xi, s in zip(x, seeds)])
    assert torch.allclose(corrupt(x, "gaussian_noise", 5, seeds), expected, atol=1e-6)
    means = x.numpy().mean(axis=(2, 3), keepdims=True)
    expected = np.clip((x.numpy() - means) * 0.05 + means, 0, 1)
    assert np.allclose(corrupt(x, "contrast", 5, [0, 0, 0]).numpy(), expected, atol=1e-6)


def _hsv_reference(x: torch.Tensor, change: callable) -> torch.Tensor:
    """Per pixel through colorsys (skimage's HSV conventions), `change(h, s, v)`."""
    out = x.clone()
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                out[b, :, i, j] = torch.tensor(colorsys.hsv_to_rgb(*change(h, s, v)))
    return out


def test_brightness_and_saturate_match_an_hsv_round_trip() -> None:
    """Brightness: V + c (.3 at severity 3); saturate: S * 5 + .1 (severity 4), both clipped;
    black and grey pixels included (their hue is 0, as in skimage)."""
    x = _photos(2, 8)
    x[0, :, 0, 0], x[0, :, 0, 1] = 0.0, 0.5
    bright = _hsv_reference(x, lambda h, s, v: (h, s, min(v + 0.3, 1.0)))
    assert torch.allclose(corrupt(x, "brightness", 3, [0, 0]), bright, atol=1e-5)
    saturated = _hsv_reference(x, lambda h, s, v: (h, min(max(s * 5 + 0.1, 0.0), 1.0), v))
    assert torch.allclose(corrupt(x, "saturate", 4, [0, 0]), saturated, atol=1e-5)


def test_gaussian_blur_is_a_truncated_gaussian_with_edge_pixels_repeated() -> None:
    """skimage's gaussian (sigma 6 px at 224, here scaled to the 56 px crop: 1.5; radius
    int(4 sigma + .5) = 6; mode nearest), by a direct 2-D sum in numpy."""
    x = _photos(1, 56)
    sigma, radius = 6 * 56 / 224, 6
    taps = np.arange(-radius, radius + 1)
    k1 = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel = np.outer(k1, k1) / np.outer(k1, k1).sum()
    padded = np.pad(x[0].numpy(), ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    expected = np.zeros((3, 56, 56))
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            expected += kernel[dy, dx] * padded[:, dy:dy + 56, dx:dx + 56]
    assert np.allclose(corrupt(x, "gaussian_blur", 5, [0])[0].numpy(), expected, atol=1e-5)


def test_impulse_noise_replaces_a_fraction_c_of_values_by_0_or_1() -> None:
    x = torch.full((4, 3, 64, 64), 0.5)
    out = corrupt(x, "impulse_noise", 5, _seeds("impulse_noise", 5, 4))  # c = .27
    changed = out != 0.5
    assert abs(float(changed.float().mean()) - 0.27) < 0.01
    assert set(out[changed].unique().tolist()) == {0.0, 1.0}


def test_unknown_corruptions_and_severities_are_named() -> None:
    with pytest.raises(ValueError, match="unknown corruption.*'frost'"):
        corrupt(_photos(1, 16), "frost", 1, [0])
    with pytest.raises(ValueError, match="severities must be in 1..5"):
        corrupt(_photos(1, 16), "fog", 6, [0])


# ---------------------------------------------------------------- evaluation

class Constant(nn.Module):
    """Always class 0 of 5."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0, 0, 0, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 5)


class BlueDecoder(nn.Module):
    """Reads the test images' label back: sample i is the flat colour png_colour(i), blue = i,
    label i % 5; undoes the ImageNet normalisation and rounds the mean blue to 8 bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blue = x[:, 2].mean((1, 2)) * IMAGENET_STD[2] + IMAGENET_MEAN[2]
        return F.one_hot((blue * 255).round().long() % 5, 5).float()


@pytest.fixture
def flat_shards(tmp_path: Path) -> str:
    write_uneven(tmp_path / "val", SIZES, CORRUPT)
    return str(tmp_path / "val")


def _decoded_reference(name: str, severity: int, seed: int) -> float:
    """Top-1 of BlueDecoder under a corruption, one image at a time, images built by hand."""
    hits = 0
    for i in READABLE:
        image = (torch.tensor(png_colour(i), dtype=torch.float32) / 255)[None, :, None, None].expand(1, 3, 16, 16)
        x = corrupt(image.contiguous(), name, severity, sample_seeds(seed, name, severity, torch.tensor([i])))
        normalised = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        hits += int(BlueDecoder()(normalised).argmax(1).item() == i % 5)
    return 100.0 * hits / len(READABLE)


def test_a_constant_classifier_scores_the_share_of_its_class_everywhere(flat_shards: str) -> None:
    result = evaluate_robustness(Constant(), flat_shards, 16, ENV, batch_size=4, workers=0,
                                 corruptions=["gaussian_noise", "fog"], severities=[1, 5])
    share = 100.0 * sum(i % 5 == 0 for i in READABLE) / len(READABLE)  # 0, 5, 10 of 12: 25%
    assert result["samples"] == 12 and result["skipped"] == 1
    assert result["clean_top1"] == pytest.approx(share)
    for entry in result["corruptions"].values():
        assert entry["top1"] == {"1": pytest.approx(share), "5": pytest.approx(share)}
    assert result["mca"] == pytest.approx(share) and result["retention"] == pytest.approx(1.0)
    assert result["mce_unnormalized"] == pytest.approx(100 - share)


def test_scores_match_a_per_image_reference(flat_shards: str) -> None:
    """Clean 100%; contrast and pixelate leave a flat image as it is (100%); noise is scored
    as corrupting each image alone with its own seed and classifying it gives."""
    result = evaluate_robustness(BlueDecoder(), flat_shards, 16, ENV, batch_size=5, workers=0,
                                 corruptions=["contrast", "pixelate", "gaussian_noise", "shot_noise"],
                                 severities=[1, 3, 5], seed=7)
    assert result["clean_top1"] == 100.0
    for name in ("contrast", "pixelate"):
        assert result["corruptions"][name]["top1"] == {"1": 100.0, "3": 100.0, "5": 100.0}
    for name in ("gaussian_noise", "shot_noise"):
        for s in (1, 3, 5):
            assert result["corruptions"][name]["top1"][str(s)] == pytest.approx(_decoded_reference(name, s, 7))
    assert result["corruptions"]["gaussian_noise"]["top1"]["5"] < 100.0  # noise does change the answers


def _robustness_on_rank(shards: str) -> dict:
    from sslforge.launcher.env import init_distributed

    return evaluate_robustness(BlueDecoder(), shards, 16, init_distributed("gloo"), batch_size=3, workers=0,
                               corruptions=["gaussian_noise", "impulse_noise", "motion_blur"], severities=[2, 5])


def test_two_ranks_give_the_numbers_of_one(flat_shards: str) -> None:
    pair = run_ranks(_robustness_on_rank, 2, flat_shards)
    single = evaluate_robustness(BlueDecoder(), flat_shards, 16, ENV, batch_size=8, workers=0,
                                 corruptions=["gaussian_noise", "impulse_noise", "motion_blur"], severities=[2, 5])
    assert pair[0] == pair[1] == single


def test_extra_sets_are_scored_on_their_own_labels(flat_shards: str, tmp_path: Path) -> None:
    """An ImageNet-R style set: 10 images, the 4 with i % 4 == 0 labelled as BlueDecoder reads them."""
    samples = [{"__key__": f"r{i:03d}", "png": png_bytes(i), "cls": i % 5 if i % 4 == 0 else (i + 1) % 5}
               for i in range(10)]
    write_shards(samples, str(tmp_path / "rendition"), prefix="r")
    result = evaluate_robustness(BlueDecoder(), flat_shards, 16, ENV, batch_size=4, workers=0, corruptions=[],
                                 extra_sets={"rendition": str(tmp_path / "rendition")})
    assert result["extra"]["rendition"]["top1"] == pytest.approx(30.0)  # 0, 4, 8 of 10
    assert result["extra"]["rendition"]["samples"] == 10
    assert result["corruptions"] == {} and "mca" not in result


def test_labels_the_classifier_cannot_predict_are_an_error(tmp_path: Path) -> None:
    write_shards([{"__key__": f"u{i}", "png": png_bytes(i)} for i in range(3)], str(tmp_path / "u"), prefix="u")
    with pytest.raises(ValueError, match="labelled shards"):
        evaluate_robustness(BlueDecoder(), str(tmp_path / "u"), 16, ENV, workers=0, corruptions=[])
    write_shards([{"__key__": f"w{i}", "png": png_bytes(i), "cls": 7} for i in range(3)], str(tmp_path / "w"),
                 prefix="w")
    with pytest.raises(ValueError, match="label 7 is outside the classifier's 5 classes"):
        evaluate_robustness(BlueDecoder(), str(tmp_path / "w"), 16, ENV, workers=0, corruptions=[])


def test_retention_and_mce_arithmetic(tmp_path: Path) -> None:
    """mean top-1 a = 70, b = 50: mCA 60, unnormalised mCE 40, retention 60/90; against a
    baseline with errors a: 40, 60 and b: 75, 75: CE_a = 100 (20+40)/(40+60) = 60,
    CE_b = 100 (50+50)/(75+75) = 66.67, mCE 63.33."""
    result = summarize(90.0, {"a": {1: 80.0, 2: 60.0}, "b": {1: 50.0, 2: 50.0}})
    assert result["mca"] == pytest.approx(60.0) and result["mce_unnormalized"] == pytest.approx(40.0)
    assert result["retention"] == pytest.approx(60 / 90)
    assert result["corruptions"]["a"]["error"] == pytest.approx(30.0)
    path = tmp_path / RESULT_FILE
    path.write_text(json.dumps(summarize(70.0, {"a": {1: 60.0, 2: 40.0}, "b": {1: 25.0, 2: 25.0}})))
    add_normalized_ce(result, load_baseline(path))
    assert result["corruptions"]["a"]["ce"] == pytest.approx(60.0)
    assert result["corruptions"]["b"]["ce"] == pytest.approx(200 / 3)
    assert result["mce"] == pytest.approx((60 + 200 / 3) / 2) and result["baseline_clean_top1"] == 70.0
    with pytest.raises(ValueError, match="no top-1 for b at severities \\['2'\\]"):
        add_normalized_ce(summarize(90.0, {"b": {1: 50.0, 2: 50.0}}), {"corruptions": {"b": {"top1": {"1": 25.0}}}})


def test_alexnet_normalisation_uses_the_published_mean_errors() -> None:
    """AlexNet's errors (augmix imagenet.py ALEXNET_ERR: gaussian noise .886428, fog .819324,
    means over severities 1-5): CE = 100 * mean error / AlexNet's."""
    result = summarize(80.0, {"gaussian_noise": {s: 40.0 + s for s in range(1, 6)},
                              "fog": dict.fromkeys(range(1, 6), 70.0)})
    add_normalized_ce(result, load_baseline("alexnet"))
    assert result["corruptions"]["gaussian_noise"]["ce"] == pytest.approx(100 * 57 / 88.6428)
    assert result["corruptions"]["fog"]["ce"] == pytest.approx(100 * 30 / 81.9324)
    with pytest.raises(ValueError, match="mean over severities 1-5: evaluate all five"):
        add_normalized_ce(summarize(80.0, {"fog": {1: 70.0, 5: 60.0}}), load_baseline("alexnet"))


def test_a_baseline_missing_a_corruption_fails_before_the_evaluation() -> None:
    with pytest.raises(ValueError, match="the baseline has no results for speckle_noise"):
        evaluate_robustness(BlueDecoder(), "/nonexistent/shards", 16, ENV, corruptions=["speckle_noise"],
                            baseline=load_baseline("alexnet"))


# ---------------------------------------------------------------- a real run (scored end to end: test_stl.py)

def _score_self_supervised(run_dir: str, val: str) -> str:
    trainer = step_trainer(run_dir, "model.backbone=resnet10", "data.image_size=16", recipe="simclr_synth")
    trainer.fit()
    save_config(trainer.cfg, Path(run_dir) / "config.yaml")
    try:
        robustness_from_run(Path(run_dir), val=val, corruptions=BENCHMARK[:1], severities=[1], workers=0)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_self_supervised_run_is_refused_naming_its_method(tmp_path: Path, synth_data: dict) -> None:
    message = run_ranks(_score_self_supervised, 1, str(tmp_path), synth_data["val"])[0]
    assert "method simclr has no classifier" in message
