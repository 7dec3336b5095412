"""Multi-crop view transforms and the evaluation transform."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from sslforge.config import ViewConfig
from timm.data.random_erasing import RandomErasing

from sslforge.data_pipeline.views import (IMAGENET_MEAN, IMAGENET_STD, CropGeometry, SeparableGaussianBlur, blur_kernel_size, cut,
                                          build_eval_transform, build_view_transform, draw_geometry,
                                          model_input)
from sslforge.data_pipeline.views import _posterize

NO_OPS = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _image(size: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels of a crop as the network receives it (uint8 ones through `model_input`)."""
    x = model_input(x[None])[0]
    return x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def _op_types(view: ViewConfig) -> set[type]:
    transform = build_view_transform([view])
    ops = set()
    finish = transform.finish[0].transforms if transform.finish[0] is not None else []
    for op in [*transform.photometric[0].transforms, *finish]:
        ops.add(type(op))
        ops.update(type(t) for t in getattr(op, "transforms", []))
    return ops


def test_shapes_and_counts_per_view():
    views = [ViewConfig(size=24, count=2), ViewConfig(size=12, count=3, solarize_p=0.2),
             ViewConfig(size=12, erase_p=0.5)]
    crops = build_view_transform(views)(_image())
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 4
    # uint8 to the trainer, but erasing's noise is in normalised units: that view comes finished
    assert [c.dtype for c in crops] == [torch.uint8] * 5 + [torch.float32]
    assert not torch.equal(crops[0], crops[1])  # two independent crops of one image


def test_deterministic_under_a_fixed_seed():
    transform = build_view_transform([ViewConfig(size=16, count=2, solarize_p=0.5)])
    image = _image()
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    second = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_ops_with_zero_probability_are_left_out():
    assert _op_types(ViewConfig(size=16, **NO_OPS)) & {
        v2.ColorJitter, v2.RandomGrayscale, SeparableGaussianBlur, v2.RandomSolarize, RandomErasing} == set()
    full = _op_types(ViewConfig(size=16, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2,
                                erase_p=0.3))
    assert {v2.ColorJitter, v2.RandomGrayscale, SeparableGaussianBlur, v2.RandomSolarize, RandomErasing} <= full


def test_a_zero_flip_probability_draws_no_flip():
    image, view = _image(), ViewConfig(size=16, **NO_OPS)
    torch.manual_seed(0)
    assert not draw_geometry(image, view).flip
    after_no_flip = torch.rand(1)
    torch.manual_seed(0)
    draw_geometry(image, ViewConfig(size=16, **{**NO_OPS, "flip_p": 0.5}))
    assert not torch.equal(torch.rand(1), after_no_flip)  # a flip probability costs one draw


def test_grayscale_makes_channels_equal():
    crops = build_view_transform([ViewConfig(size=16, count=4, **{**NO_OPS, "grayscale_p": 1.0})])(
        _image())
    for crop in crops:
        rgb = _unnormalise(crop)
        assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)
    colour = _unnormalise(build_view_transform([ViewConfig(size=16, **NO_OPS)])(_image())[0])
    assert not torch.allclose(colour[0], colour[1], atol=1e-2)


def test_solarize_only_when_enabled():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    plain = _unnormalise(build_view_transform([ViewConfig(size=8, **NO_OPS)])(white)[0])
    solarized = _unnormalise(build_view_transform(
        [ViewConfig(size=8, **{**NO_OPS, "solarize_p": 1.0})])(white)[0])
    assert torch.allclose(plain, torch.ones_like(plain), atol=1e-5)
    assert torch.allclose(solarized, torch.zeros_like(solarized), atol=1e-5)


def test_blur_kernel_is_about_ten_percent_and_odd():
    assert [blur_kernel_size(s) for s in (16, 32, 96, 224)] == [3, 3, 9, 23]


def test_eval_transform_resizes_and_centre_crops():
    assert tuple(build_eval_transform(32)(_image(50)).shape) == (3, 32, 32)
    big = Image.new("RGB", (300, 260), (255, 0, 0))
    out = _unnormalise(build_eval_transform(224)(big))
    assert tuple(out.shape) == (3, 224, 224)
    assert torch.allclose(out[:, 100, 100], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)


def test_randaugment_at_full_magnitude_posterizes_to_black() -> None:
    """timm's "inc1" posterize keeps 0 bits at magnitude 10, which Pillow 13 refuses (a worker
    crashed on it); such an image turns black, as with the Pillow timm was written for."""
    view = ViewConfig(size=16, randaugment="rand-m10-n15-inc1", **NO_OPS)
    transform = build_view_transform([view])
    for seed in range(20):  # unpatched, about half of these raise
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        assert transform(_image())[0].shape == (3, 16, 16)
    black = _posterize(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert black.getpixel((0, 0)) == (0, 0, 0)
    assert _posterize(Image.new("RGB", (4, 4), (200, 100, 50)), 2).getpixel((0, 0)) == (192, 64, 0)


def test_cut_is_torchvisions_resized_crop_and_close_to_it_on_large_boxes() -> None:
    """Up to 4x downscaling the crop is torchvision's, pixel for pixel; beyond, Pillow's integer
    pre-reduction keeps 2x the size for the bicubic pass: a faithful downscale (PSNR > 40 dB)."""
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((1200, 900)))
    image = Image.fromarray(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8))
    for box, size, exact in [((10, 20, 300, 400), 224, True), ((0, 0, 900, 1200), 224, False)]:
        for flip in (False, True):
            ours = np.asarray(cut(image, CropGeometry(box, flip), size), dtype=np.float64)
            reference = v2.functional.resized_crop(image, *box, [size, size], antialias=True,
                                                   interpolation=v2.InterpolationMode.BICUBIC)
            reference = np.asarray(v2.functional.horizontal_flip(reference) if flip else reference, dtype=np.float64)
            if exact:
                assert np.array_equal(ours, reference)
            else:
                assert 10 * np.log10(255 ** 2 / np.mean((ours - reference) ** 2)) > 40
