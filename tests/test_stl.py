"""STL: the clean view's shared geometry, Mixup/CutMix on token labels, Gumbel token labels, the
dense loss by hand, and one step of each stage on 2 ranks x B/2 == 1 rank x B."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslforge.config import ViewConfig, save_config
from sslforge.data_pipeline.mixing import Mix, MixConfig, draw_mix
from sslforge.data_pipeline.views import IMAGENET_MEAN, IMAGENET_STD, build_view_transform, model_input
from sslforge.losses.token_labels import gumbel_uniforms, soft_cross_entropy, token_labels
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import assert_two_ranks_equal_one, one_step_of, step_trainer

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _coordinate_image(width: int = 64, height: int = 48) -> Image.Image:
    """Red = column, green = row: every pixel says where in the image it is."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 128)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _pixels(crop: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels of a crop as the network receives it."""
    return model_input(crop[None])[0] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def _views(student: dict) -> list[ViewConfig]:
    return [ViewConfig(size=16, scale=[0.2, 0.6], flip_p=0.5, **student),
            ViewConfig(size=16, geometry_of=0, **PLAIN)]


def test_the_clean_view_is_the_students_crop_without_its_photometric_ops() -> None:
    """With the same seed, the clean view equals the student's crop drawn without photometric ops,
    even though the student's colour jitter and grayscale draw random numbers in between."""
    image = _coordinate_image()
    plain, augmented = build_view_transform(_views(PLAIN)), build_view_transform(
        _views(dict(jitter_p=1.0, grayscale_p=0.5, blur_p=0.0, solarize_p=0.0)))
    for seed in range(12):
        torch.manual_seed(seed)
        reference, clean_of_plain = plain(image)
        torch.manual_seed(seed)
        student, clean = augmented(image)
        assert torch.equal(clean, reference) and torch.equal(clean_of_plain, reference)
        assert not torch.allclose(student, reference, atol=1e-3)


def test_token_cells_of_both_views_cover_the_same_image_region() -> None:
    """On an image whose pixels encode their coordinates: each 4x4 token cell of the clean view
    reads the same image columns and rows as the student's cell at the same place (the student
    without colour ops, for comparison), a flipped crop has its columns decreasing, and cropped
    ones cover a sub-box of the image."""
    image = _coordinate_image()
    transform = build_view_transform(_views(PLAIN))
    flips = set()
    for seed in range(16):
        torch.manual_seed(seed)
        student, clean = (_pixels(v) for v in transform(image))
        cells = [F.avg_pool2d(v[None], 4)[0] for v in (student, clean)]  # (3, 4, 4) mean per token
        assert torch.allclose(cells[0], cells[1], atol=1e-6)
        columns = cells[1][0]  # red: the image column each token cell came from
        flipped = bool(columns[:, 0].mean() > columns[:, -1].mean())
        flips.add(flipped)
        step = torch.diff(columns, dim=1)
        assert bool((step < 0).all()) if flipped else bool((step > 0).all())
        assert bool((torch.diff(cells[1][1], dim=0) > 0).all())  # rows increase downwards
        span = float(columns.max() - columns.min())
        assert span < 1.0  # a crop of scale <= 0.6 never spans the whole width
    assert flips == {True, False}


def _id_images(b: int, size: int) -> torch.Tensor:
    """Sample i is the constant image i."""
    return torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 1, size, size).clone()


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_mixing_mixes_token_labels_with_the_images_box_and_ratio(kind: str) -> None:
    """Images where sample i is the constant i and token labels one-hot on i: after mixing, each
    token cell's mean pixel equals the expected class of its mixed token label, whatever the
    token grid (4 px and 8 px cells of a 32 px crop), and the labels' mean over the grid is the
    image label mixed by the images' corrected lambda."""
    b, size, k = 6, 32, 6
    cfg = MixConfig(mixup_alpha=0.8 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0)
    for seed in range(8):
        mix = draw_mix(cfg, size, np.random.default_rng(seed))
        assert (mix.box is not None) == (kind == "cutmix") and mix.lam < 1.0
        mixed = mix.images(_id_images(b, size))
        classes = torch.arange(k, dtype=torch.float32)
        for stride in (4, 8):
            grid = size // stride
            labels = F.one_hot(torch.arange(b), k).float()[:, None, None, :].expand(b, grid, grid, k)
            mixed_labels = mix.token_targets(labels)
            expected_class = (mixed_labels * classes).sum(-1)
            assert torch.allclose(F.avg_pool2d(mixed, stride)[:, 0], expected_class, atol=1e-5)
            assert torch.allclose(mixed_labels.mean(dim=(1, 2)), mix.targets(labels[:, 0, 0]), atol=1e-6)
        if mix.box is not None:  # lambda is the share of pixels each sample keeps
            kept = (mixed == _id_images(b, size)).float().mean(dim=(1, 2, 3))
            assert torch.allclose(kept[:b // 2], torch.full((b // 2,), mix.lam), atol=1e-6)


def test_a_clean_view_of_another_size_is_cut_by_the_same_box() -> None:
    mix = Mix(lam=0.75, box=(0, 16, 8, 24), size=32)
    big, small = mix.images(_id_images(2, 32)), mix.images(_id_images(2, 16))
    assert torch.equal(F.avg_pool2d(big, 2), small)


def test_gumbel_token_labels_are_one_hot_and_sample_the_labelers_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    confident = torch.randn(2, 3, 3, 5, generator=g)
    confident[..., 2] += 40.0  # the argmax wins whatever the noise
    labels = token_labels(confident, "gumbel", 0.0, torch.rand(confident.shape, generator=g))
    assert torch.equal(labels, F.one_hot(torch.full((2, 3, 3), 2), 5).float())
    # Gumbel-max: over many draws, class frequencies are the softmax of the logits.
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).expand(40000, 4)
    drawn = token_labels(logits, "gumbel", 0.0, torch.rand(logits.shape, generator=g))
    assert bool(((drawn == 0) | (drawn == 1)).all()) and torch.equal(drawn.sum(-1), torch.ones(40000))
    assert torch.allclose(drawn.mean(0), logits[0].softmax(0), atol=0.01)
    smoothed = token_labels(confident, "gumbel", 0.1, torch.rand(confident.shape, generator=g))
    assert torch.allclose(smoothed.max(-1).values, torch.full((2, 3, 3), 0.9 + 0.1 / 5))
    assert torch.allclose(token_labels(confident, "argmax", 0.1), smoothed)


def test_gumbel_noise_is_keyed_by_sample_not_by_position() -> None:
    first = gumbel_uniforms((2, 3), torch.tensor([7, 3, 9]), seed=1, step=4, device=torch.device("cpu"))
    swapped = gumbel_uniforms((2, 3), torch.tensor([9, 7]), seed=1, step=4, device=torch.device("cpu"))
    assert torch.equal(swapped[0], first[2]) and torch.equal(swapped[1], first[0])
    later = gumbel_uniforms((2, 3), torch.tensor([7]), seed=1, step=5, device=torch.device("cpu"))
    assert not torch.equal(later[0], first[0])


def test_dense_loss_equals_a_hand_computation() -> None:
    """STL's dense term: the mean over samples and tokens of -sum_k t_k log softmax(z)_k, with t the
    labeler's argmax one-hot smoothed by 0.1 over K = 3 classes; written out with math.log."""
    student = torch.tensor([[[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], [[[0.0, 3.0, 1.0], [-2.0, 0.0, 2.0]]]])
    labeler = torch.tensor([[[[0.1, 0.9, 0.0], [3.0, 1.0, 2.0]]], [[[0.0, 0.0, 5.0], [1.0, 4.0, 0.0]]]])
    targets = token_labels(labeler, "argmax", 0.1)  # (2, 1, 2, 3)
    total = 0.0
    for z, winner in zip(student.reshape(-1, 3).tolist(), labeler.reshape(-1, 3).argmax(-1).tolist()):
        log_norm = math.log(sum(math.exp(v) for v in z))
        t = [0.9 + 0.1 / 3 if c == winner else 0.1 / 3 for c in range(3)]
        total += -sum(t[c] * (z[c] - log_norm) for c in range(3))
    assert abs(soft_cross_entropy(student, targets).item() - total / 4) < 1e-6


def test_dense_weight_ramp_is_stls_sqrt_of_the_epoch() -> None:
    """`dense_weight_ramp_epochs: R`: dense_weight * sqrt(epoch / R) while epoch < R, as STL's
    --dynamic-dense-weight (R = 300), then dense_weight; 0 keeps it constant."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from sslforge.methods.stl import STLStudent

    def weights(ramp: float) -> np.ndarray:
        method = SimpleNamespace(cfg=OmegaConf.create({"method": {"dense_weight": 2.0, "dense_weight_ramp_epochs": ramp}}))
        return STLStudent.schedules(method, total_steps=50, steps_per_epoch=10)["dense_weight"]

    expected = [2.0 * math.sqrt(min(step // 10, 3) / 3) for step in range(50)]
    assert np.allclose(weights(3), expected) and weights(3)[0] == 0.0
    assert np.array_equal(weights(0), np.full(50, 2.0))


# ---------------------------------------------------------------- one step on 2 ranks == 1 rank

FAN = ["model.backbone=fan_tiny_hybrid", "model.depth=2", "data.image_size=32", "model.drop_path=0.0",
       "method.num_classes=3", "method.mix_prob=0.0", "method.ema_decay=0.9"]


def _train_labeler(run_dir: str) -> None:
    """One step of stage 1, checkpointed, with its config.yaml: a stage-1 run for the student."""
    trainer = step_trainer(run_dir, *FAN, recipe="stl_labeler_synth")
    trainer.fit()
    save_config(trainer.cfg, Path(run_dir) / "config.yaml")


@pytest.fixture(scope="module")
def labeler_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    run_dir = str(tmp_path_factory.mktemp("stl") / "labeler")
    run_ranks(_train_labeler, 1, run_dir)
    return run_dir


@pytest.mark.parametrize("recipe", ["stl_labeler_synth", "stl_student_synth"])
def test_one_step_of_each_stage_on_two_ranks_equals_one(recipe: str, labeler_run: str, tmp_path: Path) -> None:
    """Class-token and token losses, gradients, parameters and the EMA after one step; the
    student's Gumbel labels included (mixing off: partners are drawn within each rank's batch)."""
    overrides = [*FAN, f"method.labeler={labeler_run}"] if recipe == "stl_student_synth" else FAN
    single = run_ranks(one_step_of, 1, str(tmp_path / "one"), recipe, *overrides)[0]
    pair = run_ranks(one_step_of, 2, str(tmp_path / "two"), recipe, *overrides)
    assert_two_ranks_equal_one(single, pair, atol=2e-5)
    dense = "dense_loss" if recipe == "stl_student_synth" else "token_mean_loss"
    assert single["metrics"][dense] > 0 and abs(pair[0]["metrics"][dense] - single["metrics"][dense]) < 2e-5


# ---------------------------------------------------------------- both stages through the CLI

@pytest.mark.slow
def test_stage_one_then_stage_two_train_end_to_end(synth_data: dict, tmp_path: Path) -> None:
    """The CPU presets through `sslforge train` on 2 ranks: the labeler, then a student reading
    the labeler's run; each logs finite losses, its token loss and val top-1, and checkpoints.
    A student pointed at a run that is not a labeler is refused before any rank starts. Then
    `eval robustness` scores the student and `eval token-labels` draws the labeler's maps."""
    from tests.test_cli import sslforge

    common = [f"data.train={synth_data['train']}", f"data.val={synth_data['val']}", "train.steps=2",
              "train.log_every_steps=1", "eval.every_epochs=0", "eval.at_end=true", "logging.progress=false", "model.depth=2"]
    labeler, student = tmp_path / "labeler", tmp_path / "student"
    for preset, run_dir, own in (("stl_labeler_synth", labeler, []),
                                 ("stl_student_synth", student, [f"method.labeler={labeler}"])):
        result = sslforge("train", preset, *common, f"run_dir={run_dir}", *own, "--nproc", "2", timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        token_loss = "dense_loss" if preset == "stl_student_synth" else "token_mean_loss"
        assert len([r for r in records if math.isfinite(r.get(token_loss, math.nan))]) == 2
        assert [r for r in records if 0 <= r.get("val_top1", -1) <= 100]
        assert (run_dir / "checkpoints" / "latest").is_file()
    refused = sslforge("train", "stl_student_synth", *common, f"run_dir={tmp_path / 'bad'}",
                       f"method.labeler={student}", "--nproc", "2", timeout=120)
    assert refused.returncode == 2 and "stl_labeler" in refused.stderr
    # the evaluations of a trained stage, through their command lines
    scored = sslforge("eval", "robustness", str(student), "--corruptions", "gaussian_noise,contrast",
                      "--severities", "1,5", "--extra", f"again={synth_data['val']}", "--workers", "0", timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads((student / "robustness.json").read_text())
    assert set(result["corruptions"]) == {"gaussian_noise", "contrast"} and result["step"] == 2
    assert result["samples"] == 256  # every val image of conftest's synth_data, once
    assert result["extra"]["again"]["top1"] == result["clean_top1"]  # the same set, scored again
    record = json.loads((student / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval"] == "robustness" and record["mca"] == result["mca"]
    assert record["top1/again"] == result["clean_top1"]
    drawn = sslforge("eval", "token-labels", str(labeler), "--count", "2", "--out", str(tmp_path / "maps.png"),
                     timeout=300)
    assert drawn.returncode == 0 and (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG"
    bad = sslforge("eval", "robustness", str(student), "--corruptions", "frost", timeout=120)
    assert bad.returncode == 2 and "frost" in bad.stderr
