"""Reduced-size JPEG decode, uint8 crops to the trainer, the separable blur (issue 13).

Each check has its own reference: the crop-resolution bound written out here, PIL's full decode,
torchvision's Gaussian blur, and today's float pipeline rebuilt from torchvision's ops.
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import RandomResizedCrop, v2

from sslforge.config import ViewConfig
from sslforge.data_pipeline.shards import write_shards
from sslforge.data_pipeline.stream import ShardLoader, _Raw, decode_sample
from sslforge.data_pipeline.views import (DECODE_MARGIN, IMAGENET_MEAN, IMAGENET_STD, CropGeometry,
                                          SeparableGaussianBlur, blur_kernel_size, build_eval_transform,
                                          build_view_transform, cut, draw_geometry, model_input, unit_pixels)
from tests.data_helpers import png_colour

RATIO = [3 / 4, 4 / 3]  # RandomResizedCrop's aspect range, which the bound below assumes
PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
SIMCLR = [ViewConfig(size=224, count=2, scale=[0.08, 1.0])]
DINO = [ViewConfig(size=224, count=2, scale=[0.4, 1.0]), ViewConfig(size=96, count=8, scale=[0.05, 0.4])]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread, as in a DataLoader worker (which sets it so): these crops are too small
    to share, and on a busy machine each tiny op waiting for a second thread costs 10-30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- images

def jpeg(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def pink_noise(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean float32 noise with a 1/f amplitude spectrum: equal energy in every octave, from
    the image's size down to single pixels, as in photographs. Made in the Fourier domain (a
    fraction of a second at 4800x3600)."""
    frequency = np.hypot(np.fft.rfftfreq(width).astype(np.float32), np.fft.fftfreq(height).astype(np.float32)[:, None])
    frequency[0, 0] = np.inf  # no constant term: the gradients set the mean
    spectrum = np.empty(frequency.shape, np.complex64)
    spectrum.real, spectrum.imag = (rng.standard_normal(frequency.shape, np.float32) for _ in range(2))
    spectrum /= frequency
    noise = np.fft.irfft2(spectrum, s=(height, width))
    return noise / noise.std()


def natural_image(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content: smooth colour gradients, 1/f texture (30 grey levels) and sharp-edged
    shapes. Float32 throughout: memory, not arithmetic, is the cost at 4800x3600."""
    rng = np.random.default_rng(seed)
    x, y = np.linspace(0, 1, width, dtype=np.float32), np.linspace(0, 1, height, dtype=np.float32)
    pixels = 30 * pink_noise(width, height, rng)[..., None] * np.float32([1.0, 0.8, 0.6])
    pixels += 60 + 120 * x[:, None] * np.float32([1, 0, 0.5])  # one (W, 3) row, added in place
    pixels += 100 * y[:, None, None] * np.float32([0, 1, 0.3])
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(1 + height // 20, 2 + height // 5)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def raw(encoded: bytes, ext: str = "jpg") -> _Raw:
    """A sample as the shard reader hands it to `decode_sample`."""
    return _Raw(0, "k", "memory", {ext: encoded})


def decode(encoded: bytes, decode_size: Callable | None, ext: str = "jpg") -> Image.Image:
    image, _ = decode_sample(raw(encoded, ext), decode_size)
    assert image is not None and image.mode == "RGB"
    return image


# DINO's views decode these at 1/2 and 1/4 (worked out by hand in section 1); 500x375 (ImageNet's
# typical size) and 1600x1200 decode whole for the training views.
SMALL, MEDIUM, HALF, QUARTER = (500, 375), (1600, 1200), (2400, 1800), (4800, 3600)


@pytest.fixture(scope="module")
def photos() -> dict[tuple[int, int], bytes]:
    """One photo-like JPEG per size, shared by every test (the large ones take a second to make)."""
    return {size: jpeg(natural_image(*size, seed=size[0])) for size in (SMALL, MEDIUM, HALF, QUARTER)}


@pytest.fixture(scope="module")
def full(photos: dict[tuple[int, int], bytes]) -> dict[tuple[int, int], Image.Image]:
    """PIL's full decode of each photo: the reference every reduced decode is held to."""
    return {size: decode(encoded, None) for size, encoded in photos.items()}


# ----------------------------------------------------------------------------- 1. the bound

# A reduced decode keeps at least this many decoded pixels per output pixel along the smallest
# crop's shorter side (Pillow's reducing_gap): one is full resolution but measurably softer.
MARGIN = 2


def test_the_code_keeps_the_margin_this_file_assumes() -> None:
    assert DECODE_MARGIN == 2.0


def bound_scale(views: Sequence[ViewConfig], width: int, height: int) -> int:
    """The largest DCT scale s in {1, 2, 4, 8} at which the smallest crop any view may draw (area
    min_scale * W*H/s^2, aspect 3/4) still has a shorter side of MARGIN x the view's size."""
    return max(s for s in (1, 2, 4, 8) if s == 1 or all(
        math.sqrt(v.scale[0] * width * height * 3 / 4) / s >= MARGIN * v.size for v in views))


def eval_bound_scale(resize: int, width: int, height: int) -> int:
    """The largest DCT scale s in {1, 2, 4, 8} leaving the shorter side MARGIN x the resize target."""
    return max(s for s in (1, 2, 4, 8) if s == 1 or min(width, height) / s >= MARGIN * resize)


def crop_short_sides(image: Image.Image, view: ViewConfig, draws: int = 400) -> list[int]:
    """Shorter sides of crop boxes RandomResizedCrop draws on `image` for `view`: random ones,
    and the worst cases (the least area at either extreme aspect)."""
    torch.manual_seed(0)
    boxes = [RandomResizedCrop.get_params(image, list(view.scale), RATIO) for _ in range(draws)]
    smallest = [view.scale[0]] * 2
    boxes += [RandomResizedCrop.get_params(image, smallest, [r, r]) for r in RATIO]
    return [min(h, w) for _, _, h, w in boxes]


def reduced_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """libjpeg's size at DCT scale 1/scale: each side rounded up."""
    return math.ceil(size[0] / scale), math.ceil(size[1] / scale)


# Worked by hand from the bound (shorter side of the smallest crop over 2 x the view size):
# SimCLR, sqrt(0.08*W*H*3/4)/448: 500 -> 0.24, 1600 -> 0.76, 2400 -> 1.14, 4800 -> 2.27 (1/2).
# DINO's 96 px locals bind, sqrt(0.05*W*H*3/4)/192: 500 -> 0.44, 1600 -> 1.40, 2400 -> 2.10 (1/2),
# 4800 -> 4.19 (1/4); its 224 px globals, sqrt(0.4*W*H*3/4)/448: 0.53, 1.69, 2.54, 5.08.
@pytest.mark.parametrize(("views", "size", "scale"), [
    (SIMCLR, SMALL, 1), (SIMCLR, MEDIUM, 1), (SIMCLR, HALF, 1), (SIMCLR, QUARTER, 2),
    (DINO, SMALL, 1), (DINO, MEDIUM, 1), (DINO, HALF, 2), (DINO, QUARTER, 4),
], ids=["simclr-500", "simclr-1600", "simclr-2400", "simclr-4800", "dino-500", "dino-1600", "dino-2400", "dino-4800"])
def test_decode_size_reduces_as_far_as_every_crop_keeps_twice_its_resolution(
        photos: dict[tuple[int, int], bytes], views: list[ViewConfig], size: tuple[int, int], scale: int) -> None:
    assert bound_scale(views, *size) == scale
    decoded = decode(photos[size], build_view_transform(views).decode_size)
    assert decoded.size == reduced_size(size, scale)
    if scale > 1:  # an image decoded whole keeps what resolution it has
        for view in views:
            assert min(crop_short_sides(decoded, view)) >= MARGIN * view.size


# Eval at 224 px resizes the shorter side to 256: min(W, H)/512 is 500 -> 0.73, 1600 -> 2.34 (1/2),
# 2400 -> 3.52 (1/2), 4800 -> 7.03 (1/4).
@pytest.mark.parametrize(("size", "scale"), [(SMALL, 1), (MEDIUM, 2), (HALF, 2), (QUARTER, 4)],
                         ids=["500", "1600", "2400", "4800"])
def test_the_eval_decode_keeps_twice_the_resize_target(
        photos: dict[tuple[int, int], bytes], size: tuple[int, int], scale: int) -> None:
    transform = build_eval_transform(224)
    assert transform.resize == 256 and eval_bound_scale(256, *size) == scale
    decoded = decode(photos[size], transform.decode_size)
    assert decoded.size == reduced_size(size, scale)
    assert scale == 1 or min(decoded.size) >= MARGIN * 256


# ----------------------------------------------------------------------------- 2. the stream

BIG_SAMPLES = 6


def label_of(i: int) -> int:
    return 7 * i % 10


class DecodedSize:
    """The wrapped transform's crops plus the decoded image's (width, height) as one more
    'view', so the size shows in batches from worker processes too. It offers the transform's
    `decode_size` to the stream only when `reduce`; without, the stream decodes whole."""

    def __init__(self, views: list[ViewConfig], reduce: bool) -> None:
        self.transform = build_view_transform(views)
        if reduce:
            self.decode_size = self.transform.decode_size

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [*self.transform(image), torch.tensor(image.size)]


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two shards of 2400x1800 JPEGs, each one flat colour naming its sample, so a crop shows
    which image it came from wherever its box lies."""
    samples = ({"__key__": f"big{i:03d}", "jpg": jpeg(Image.new("RGB", HALF, png_colour(i))), "cls": label_of(i)}
               for i in range(BIG_SAMPLES))
    return write_shards(samples, str(tmp_path_factory.mktemp("big")), max_per_shard=3)


def load(shards: list[str], reduce: bool, workers: int) -> list[dict[str, Any]]:
    views = [ViewConfig(size=224, count=2, scale=[0.4, 1.0], **PLAIN),
             ViewConfig(size=96, count=3, scale=[0.05, 0.4], **PLAIN)]  # DINO's geometry
    loader = ShardLoader(shards, 4, DecodedSize(views, reduce), num_workers=workers, shuffle_buffer=8, seed=3)
    return list(loader)


def test_the_stream_decodes_reduced_with_the_same_crops_labels_and_indices(big_shards: list[str]) -> None:
    full, reduced = load(big_shards, reduce=False, workers=0), load(big_shards, reduce=True, workers=0)
    assert len(full) == len(reduced) == 2
    for whole, small in zip(full, reduced, strict=True):
        assert torch.equal(whole["index"], small["index"]) and torch.equal(whole["label"], small["label"])
        assert small["label"].tolist() == [label_of(i) for i in small["index"].tolist()]
        assert whole["views"][-1].tolist() == [list(HALF)] * 4
        assert small["views"][-1].tolist() == [list(reduced_size(HALF, 2))] * 4
        colours = torch.tensor([png_colour(i) for i in small["index"].tolist()])[:, :, None, None]
        for size, a, b in zip([224, 224, 96, 96, 96], whole["views"], small["views"]):
            assert a.shape == b.shape == (4, 3, size, size) and b.dtype == torch.uint8
            assert (a.int() - b.int()).abs().max() <= 1
            assert (b.int() - colours).abs().max() <= 3  # JPEG's error on a flat colour
    with_worker = load(big_shards, reduce=True, workers=1)
    for a, b in zip(reduced, with_worker, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))


# ----------------------------------------------------------------------------- 3. formats

@pytest.mark.parametrize("kind", ["progressive", "cmyk", "grey"])
def test_jpeg_kinds_decode_reduced_to_the_full_decode_downscaled(
        kind: str, full: dict[tuple[int, int], Image.Image]) -> None:
    photo = full[HALF]
    source = {"progressive": photo, "cmyk": photo.convert("CMYK"), "grey": photo.convert("L")}[kind]
    encoded = jpeg(source, progressive=kind == "progressive")
    decode_size = build_view_transform(DINO).decode_size
    got = decode(encoded, decode_size)
    assert got.size == reduced_size(HALF, 2) and got.width >= decode_size(*HALF)[0]
    whole = Image.open(io.BytesIO(encoded)).convert("RGB").reduce(2)  # PIL's full decode, box-averaged
    difference = np.abs(np.asarray(got, np.float32) - np.asarray(whole, np.float32))
    assert difference.mean() < 1  # grey levels; measured 0.09-0.25
    if kind == "grey":
        pixels = np.asarray(got)
        assert (pixels == pixels[..., :1]).all()


def test_a_png_decodes_whole_and_exact(full: dict[tuple[int, int], Image.Image]) -> None:
    buffer = io.BytesIO()
    full[HALF].save(buffer, "PNG", compress_level=1)
    got = decode(buffer.getvalue(), build_view_transform(DINO).decode_size, ext="png")
    assert np.array_equal(np.asarray(got), np.asarray(full[HALF]))


# ----------------------------------------------------------------------------- 4. crop statistics

def laplacian_energy(crop: np.ndarray) -> float:
    """Mean |4-neighbour Laplacian| of the luma: the crop's top-octave detail, what blur removes."""
    g = crop.mean(-1)
    return float(np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).mean())


def assert_detail_kept(ratios: list[float]) -> None:
    """No blur at the crop size: the reduced decode's crops keep their top-octave detail within a
    few percent of the full decode's, 5% on average and 10% for any one crop."""
    assert np.mean(ratios) >= 0.95 and min(ratios) >= 0.90, f"detail kept: {np.round(ratios, 3).tolist()}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255 ** 2 / max(float(((a - b) ** 2).mean()), 1e-12))


def crop_pair(full: Image.Image, reduced: Image.Image, view: ViewConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One random box cut from the full decode and the same box, in relative terms, from the
    reduced one (snapped to the scale so both name exactly the same pixels), at the view's size."""
    s = full.width // reduced.width
    torch.manual_seed(seed)
    box = [v // s * s for v in RandomResizedCrop.get_params(full, list(view.scale), RATIO)]
    crops = [cut(image, CropGeometry(tuple(v // k for v in box), False), view.size) for image, k in
             ((full, 1), (reduced, s))]
    return np.asarray(crops[0], np.float32), np.asarray(crops[1], np.float32)


@pytest.mark.parametrize(("size", "scale"), [(HALF, 2), (QUARTER, 4)], ids=["half", "quarter"])
@pytest.mark.parametrize("view", DINO, ids=["224", "96"])
def test_crops_from_the_reduced_decode_match_those_of_the_full_one(
        photos: dict[tuple[int, int], bytes], full: dict[tuple[int, int], Image.Image],
        size: tuple[int, int], scale: int, view: ViewConfig) -> None:
    reduced = decode(photos[size], build_view_transform(DINO).decode_size)
    assert reduced.size == reduced_size(size, scale)
    detail = []
    for seed in range(16):
        a, b = crop_pair(full[size], reduced, view, seed)
        assert psnr(a, b) >= 35
        assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() <= 1  # grey levels
        np.testing.assert_allclose(b.std((0, 1)), a.std((0, 1)), rtol=0.03)
        detail.append(laplacian_energy(b) / laplacian_energy(a))
    assert_detail_kept(detail)


def test_the_eval_transform_decodes_reduced_without_losing_detail(
        photos: dict[tuple[int, int], bytes], full: dict[tuple[int, int], Image.Image]) -> None:
    transform = build_eval_transform(224)
    detail = []
    for size in (MEDIUM, HALF, QUARTER):  # 1/2, 1/2, 1/4 (section 1)
        reduced = decode(photos[size], transform.decode_size)
        assert reduced.width < size[0] and min(reduced.size) >= MARGIN * transform.resize
        a, b = (unit_pixels(transform(image)[None])[0].permute(1, 2, 0).numpy() * 255
                for image in (full[size], reduced))
        assert b.shape == (224, 224, 3) and psnr(a, b) >= 35
        detail.append(laplacian_energy(b) / laplacian_energy(a))
    assert_detail_kept(detail)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = [np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b)]
    return float(np.abs(cdf[0] - cdf[1]).max())


def relative_boxes(image: Image.Image, view: ViewConfig, draws: int) -> np.ndarray:
    """(relative area, aspect w/h) of crop boxes drawn on `image`, one seed per draw."""
    out = []
    for seed in range(draws):
        torch.manual_seed(seed)
        _, _, h, w = RandomResizedCrop.get_params(image, list(view.scale), RATIO)
        out.append((h * w / (image.width * image.height), w / h))
    return np.array(out)


@pytest.mark.parametrize("view", DINO, ids=["224", "96"])
def test_crop_boxes_cover_the_same_share_of_a_reduced_image(view: ViewConfig) -> None:
    full, quarter = Image.new("RGB", QUARTER), Image.new("RGB", reduced_size(QUARTER, 4))  # get_params reads sizes
    a, b = relative_boxes(full, view, 1000), relative_boxes(quarter, view, 1000)
    for column in range(2):  # area, aspect
        assert ks_distance(a[:, column], b[:, column]) < 0.03
        np.testing.assert_allclose(np.quantile(b[:, column], [0.1, 0.5, 0.9]),
                                   np.quantile(a[:, column], [0.1, 0.5, 0.9]), rtol=0.02)


# ----------------------------------------------------------------------------- 5. uint8 transport

def seed_all(seed: int) -> None:
    """Seed what the stream seeds per sample: torch's CPU generator, Python's and numpy's."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def todays_float_views(views: list[ViewConfig]) -> Callable[[Image.Image], list[torch.Tensor]]:
    """The float32 pipeline before uint8 transport, rebuilt from torchvision's ops (its 2-D
    Gaussian blur included) and timm's erasing, drawing in the same order."""
    def ops(view: ViewConfig) -> v2.Compose:
        jitter = v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
        blur = v2.GaussianBlur(blur_kernel_size(view.size), sigma=(0.1, 2.0))
        steps = [v2.RandomApply([jitter], p=view.jitter_p) if view.jitter_p else None,
                 v2.RandomGrayscale(view.grayscale_p) if view.grayscale_p else None, v2.PILToTensor(),
                 v2.RandomApply([blur], p=view.blur_p) if view.blur_p else None,
                 v2.RandomSolarize(threshold=128, p=view.solarize_p) if view.solarize_p else None,
                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                 RandomErasing(view.erase_p, mode="pixel", device="cpu") if view.erase_p else None]
        return v2.Compose([step for step in steps if step is not None])

    pipelines = [ops(view) for view in views]
    return lambda image: [pipeline(cut(image, draw_geometry(image, view), view.size))
                          for view, pipeline in zip(views, pipelines) for _ in range(view.count)]


TRANSPORT_VIEWS = [
    ViewConfig(size=40, count=2, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, solarize_p=0.5),
    ViewConfig(size=24, count=3, jitter_p=0.8, grayscale_p=0.2, blur_p=0.9, solarize_p=1.0),
    ViewConfig(size=24, count=1, erase_p=1.0),
]


def test_uint8_crops_normalise_to_the_float_pipelines_crops() -> None:
    uint8, float32 = build_view_transform(TRANSPORT_VIEWS), build_view_transform(TRANSPORT_VIEWS, torch.float32)
    today = todays_float_views(TRANSPORT_VIEWS)
    image = natural_image(96, 72, seed=0)
    one_level = (1 / 255) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + 1e-5  # normalised units
    ends = np.cumsum([view.count for view in TRANSPORT_VIEWS]).tolist()
    groups = list(zip([0, *ends], ends))
    for seed in range(8):
        outputs = []
        for transform in (uint8, float32, today):
            seed_all(seed)
            outputs.append(transform(image))
        assert [c.dtype for c in outputs[0]] == [torch.uint8] * 5 + [torch.float32]
        for lo, hi in groups:
            sent = model_input(torch.stack(outputs[0][lo:hi]))
            assert torch.allclose(sent, torch.stack(outputs[1][lo:hi]), rtol=0, atol=1e-5)
            assert ((sent - torch.stack(outputs[2][lo:hi])).abs() <= one_level).all()


# ----------------------------------------------------------------------------- 6. the blur

@pytest.mark.parametrize(("kernel", "size"), [(3, 16), (3, 224), (23, 16), (23, 224)])
def test_separable_blur_is_torchvisions_gaussian_blur(kernel: int, size: int) -> None:
    crop = torch.from_numpy(np.array(natural_image(size, size, seed=size))).permute(2, 0, 1).contiguous()
    for seed in range(4):
        torch.manual_seed(seed)
        ours = SeparableGaussianBlur(kernel)(crop)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        theirs = v2.GaussianBlur(kernel, sigma=(0.1, 2.0))(crop)  # draws sigma as ours must
        assert torch.equal(torch.rand(1), after_ours)
        assert ours.dtype == torch.uint8 and ours.shape == crop.shape
        assert (ours.int() - theirs.int()).abs().max() <= 1
