"""`sslforge eval token-labels`: the token label map and confidence of a dense classifier, the
picture drawn from them, and a real STL labeler run end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sslforge.config import save_config
from sslforge.eval.token_labels import draw_token_labels, plot_token_labels, rank_classes, token_label_maps
from sslforge.models.token_classifier import DenseLogits
from tests.dist_harness import run_ranks
from tests.trainer_fixtures import step_trainer

PATCH = 4


class RedSign(nn.Module):
    """Token logits (-2 m, 2 m) with m the mean red of its 4x4 patch: class 1 where the patch
    is red-positive, with confidence sigmoid(4 |m|); the class token averages the tokens."""

    dense = True  # as `Classifier.dense`: per-token logits available

    def forward_dense(self, x: torch.Tensor) -> DenseLogits:
        red = F.avg_pool2d(x[:, :1], PATCH)[:, 0]
        tokens = torch.stack([-2 * red, 2 * red], dim=-1)
        return DenseLogits(tokens.mean((1, 2)), tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dense(x).cls


PATCH_RED = [[[1.0, -0.5, 0.25], [-1.0, 2.0, -0.1]],
             [[-0.3, -0.2, -0.7], [0.4, 0.1, -2.0]]]  # per image, per token: the patch's red


def _patch_images() -> torch.Tensor:
    """Two 8x12 images whose 4x4 patches have the red values of PATCH_RED (other channels random)."""
    images = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    for b, grid in enumerate(PATCH_RED):
        for r, row in enumerate(grid):
            for c, red in enumerate(row):
                images[b, 0, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = red
    return images


def test_token_labels_and_confidence_of_a_known_dense_module() -> None:
    maps = token_label_maps(RedSign(), _patch_images())
    expected_labels = [[[1 if red > 0 else 0 for red in row] for row in grid] for grid in PATCH_RED]
    expected_confidence = [[[1 / (1 + math.exp(-4 * abs(red))) for red in row] for row in grid] for grid in PATCH_RED]
    assert maps.labels.tolist() == expected_labels
    assert torch.allclose(maps.confidence, torch.tensor(expected_confidence), atol=1e-6)
    assert maps.predicted.tolist() == [1, 0]  # mean red of image 0 is > 0, of image 1 < 0


def test_a_classifier_without_per_token_logits_is_refused() -> None:
    with pytest.raises(ValueError, match="Linear has no forward_dense"):
        token_label_maps(nn.Linear(3, 2), torch.zeros(1, 3))


def test_classes_get_colour_slots_by_frequency() -> None:
    labels = torch.tensor([[2, 2, 5], [5, 2, 7]])
    slots, shown = rank_classes(labels)
    assert slots.tolist() == [[0, 0, 1], [1, 0, 2]] and shown == [2, 5, 7]
    slots, shown = rank_classes(labels, shown=1)  # the rest share the "other" slot
    assert slots.tolist() == [[0, 0, 1], [1, 0, 1]] and shown == [2]


def test_the_figure_draws_the_maps_over_the_images() -> None:
    """Row 2 overlays each image's colour slots on the token grid stretched over the pixels,
    row 3 its confidences; legends and titles name the classes."""
    images = _patch_images()
    maps = token_label_maps(RedSign(), images)
    pixels = images.sigmoid()  # any [0, 1] picture
    fig = plot_token_labels(pixels, maps, torch.tensor([1, 0]), names=["dark", "red"])
    try:
        for i in range(2):
            overlay = fig.axes[2 + i].images[1]
            assert overlay.get_array().tolist() == rank_classes(maps.labels[i])[0].tolist()
            assert overlay.get_extent() == [0, 12, 8, 0]  # 3 x 2 tokens over the 12 x 8 pixels
            heat = fig.axes[4 + i].images[0].get_array()
            assert torch.allclose(torch.tensor(heat.data), maps.confidence[i])
            legend = [t.get_text() for t in fig.axes[2 + i].get_legend().get_texts()]
            assert legend == ["dark", "red"]  # image 0: 3 tokens each (tie: lower class first); image 1: 4 and 2
        mean_red = sum(sum(row) for row in PATCH_RED[0]) / 6  # class-token logits (-2 m, 2 m) of the mean
        assert fig.axes[2].get_title() == f"cls: red ({1 / (1 + math.exp(-4 * mean_red)):.2f})"
        assert fig.axes[0].get_title() == "label: red" and fig.axes[1].get_title() == "label: dark"
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


# ---------------------------------------------------------------- real runs

FAN = ["model.backbone=fan_tiny_hybrid", "model.depth=2", "data.image_size=32", "model.drop_path=0.0",
       "method.num_classes=10", "method.mix_prob=0.0", "method.ema_decay=0.9"]


def _train_runs(root: str) -> None:
    """One checkpointed step of the STL labeler (dense) and of plain supervised training."""
    for recipe in ("stl_labeler_synth", "supervised_synth"):
        run_dir = str(Path(root) / recipe)
        trainer = step_trainer(run_dir, *FAN, recipe=recipe)
        trainer.fit()
        save_config(trainer.cfg, Path(run_dir) / "config.yaml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("token_label_runs")
    run_ranks(_train_runs, 1, str(root))
    return root


def test_a_labeler_run_is_drawn(runs: Path, synth_data: dict) -> None:
    out = draw_token_labels(runs / "stl_labeler_synth", synth_data["val"], count=3)
    assert out == runs / "stl_labeler_synth" / "token_labels_step1.png"
    with Image.open(out) as picture:
        width, height = picture.size
    assert 500 < width < 1000 and 600 < height < 1100  # 3 columns of 2.4 in, 3 rows in 8.2 in, at 100 dpi
    wider = draw_token_labels(runs / "stl_labeler_synth", synth_data["val"], out=runs / "six.png", count=6)
    with Image.open(wider) as picture:
        assert picture.size[0] > 1.6 * width and abs(picture.size[1] - height) < 100


def test_a_run_without_token_logits_is_refused_naming_its_method(runs: Path, synth_data: dict) -> None:
    with pytest.raises(ValueError, match="method supervised has no per-token head"):
        draw_token_labels(runs / "supervised_synth", synth_data["val"], count=2)
