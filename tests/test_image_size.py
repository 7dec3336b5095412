"""View sizes follow `data.image_size` by one rule (issue 7, item F).

A view with no `size` crops at `data.image_size`; a view's `size` is in pixels at the
`data.image_size` of the recipe (or command line) that wrote it, so changing the image size
later scales it by the same ratio (multi-crop stays in proportion); a size given on the command
line is used as given. `sslforge train simclr data.image_size=32` used to crop at 224 anyway.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sslforge.config import ViewConfig, load_config
from sslforge.data_pipeline.views import build_view_transform
from sslforge.trainer.loop import Trainer

# SwAV's multi-crop written at 224 px: 2 global crops and 6 local ones of 96 px.
MULTI_CROP = """inherits: swav
data:
  image_size: 224
  views:
    - {size: 224, count: 2}
    - {size: 96, count: 6}
"""


def _sizes(cfg) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return [(v.size, v.count) for v in cfg.data.views]


def _scaled(size: int, new: int, old: int) -> int:
    return round(size * new / old)


@pytest.fixture
def multi_crop(tmp_path: Path) -> str:
    path = tmp_path / "multicrop.yaml"
    path.write_text(MULTI_CROP)
    return str(path)


def test_recipe_view_sizes_scale_with_an_overridden_image_size(multi_crop: str) -> None:
    assert _sizes(load_config(multi_crop)) == [(224, 2), (96, 6)]
    assert _sizes(load_config(multi_crop, ["data.image_size=32"])) == [(32, 2), (_scaled(96, 32, 224), 6)]
    assert _scaled(96, 32, 224) == 14
    # order does not matter; a key of the view other than its size keeps the size scaling
    cfg = load_config(multi_crop, ["data.views.1.count=4", "data.image_size=112"])
    assert _sizes(cfg) == [(112, 2), (48, 4)]


def test_a_view_size_given_on_the_command_line_is_used_as_given(multi_crop: str) -> None:
    cfg = load_config(multi_crop, ["data.image_size=32", "data.views.1.size=20"])
    assert _sizes(cfg) == [(32, 2), (20, 6)]
    cfg = load_config(multi_crop, ["data.image_size=32", "data.views=[{size: 24, count: 2}]"])
    assert _sizes(cfg) == [(24, 2)]


def test_a_recipe_that_inherits_views_scales_them_with_its_own_image_size(multi_crop: str, tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"inherits: {multi_crop}\ndata:\n  image_size: 64\n")
    assert _sizes(load_config(str(child))) == [(64, 2), (_scaled(96, 64, 224), 6)]


def test_views_without_a_size_crop_at_the_image_size() -> None:
    assert _sizes(load_config("simclr")) == [(224, 2)]
    assert _sizes(load_config("simclr", ["data.image_size=32"])) == [(32, 2)]
    assert _sizes(load_config("simclr_synth", ["data.image_size=24"])) == [(24, 2)]


def test_a_view_without_a_size_is_refused_where_no_config_sized_it() -> None:
    with pytest.raises(ValueError, match="needs a size"):
        build_view_transform([ViewConfig(count=2)])


def _delivered(cfg) -> list[int]:  # type: ignore[no-untyped-def]
    """Crop sides of the first batch from the trainer's own loader (one rank, no workers)."""
    trainer = SimpleNamespace(cfg=cfg, local_batch=4, env=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    loader = Trainer._build_loader(trainer)  # type: ignore[arg-type]
    loader.set_epoch(0)
    views = next(iter(loader))["views"]
    assert all(v.shape[-2] == v.shape[-1] for v in views)
    return [v.shape[-1] for v in views]


@pytest.mark.parametrize("recipe, overrides, expected", [
    ("simclr_synth", [], [16, 16]),  # listed views without a size
    ("simclr_synth", ["data.image_size=24"], [24, 24]),
    ("simclr_synth", ["data.views=[]"], [16, 16]),  # the method's own views
    ("simclr_synth", ["data.views=[]", "data.image_size=24"], [24, 24]),
    ("multi_crop", ["data.image_size=32"], [32, 32, 14, 14, 14, 14, 14, 14]),
    ("multi_crop", ["data.image_size=16"], [16, 16, 7, 7, 7, 7, 7, 7]),
])
def test_the_loader_delivers_the_predicted_sizes(synth_data: dict, multi_crop: str, recipe: str,
                                                  overrides: list[str], expected: list[int]) -> None:
    cfg = load_config(multi_crop if recipe == "multi_crop" else recipe,
                      [f"data.train={synth_data['train']}", "data.num_workers=0", *overrides])
    assert _delivered(cfg) == expected
