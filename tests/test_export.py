"""`sslforge export`: the evaluated encoder (and classifier head) loads strictly into the plain
torchvision / timm model, which then gives sslforge's features and logits; export.json describes
the run and the evaluation preprocessing; bad inputs are one line, exit 2.

The runs are one real training step each (Trainer, DeepSpeed engine, checkpoint), made once for
the module: SimCLR on a stock-stem ResNet-50, DINO on a 2-block ViT-Tiny, a supervised ResNet-10
with the small-image stem and a linear probe with feature BN on that run's encoder.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision.models.resnet import BasicBlock, ResNet

from sslforge.cli import main
from sslforge.config import load_config, load_resolved, save_config
from sslforge.data_pipeline.views import build_eval_transform
from sslforge.eval.run import load_method
from sslforge.export import ExportError, describe, eval_preprocessing, export_run, fold_linear_head
from sslforge.methods import build_method
from sslforge.methods.base import Method
from tests.conftest import rank_variables_kept
from tests.trainer_fixtures import step_trainer

ATOL = 1e-5


class Run(NamedTuple):
    dir: Path
    method: Method  # loaded back from its checkpoint by sslforge's evaluation code (`load_method`)


def _one_step_run(run_dir: Path, recipe: str, *overrides: str) -> Run:
    """A real run directory: config.yaml and the checkpoint of one training step."""
    with rank_variables_kept():
        trainer = step_trainer(str(run_dir), *overrides, recipe=recipe)
        trainer.fit()
    save_config(trainer.cfg, run_dir / "config.yaml")
    return Run(run_dir, load_method(run_dir)[2])


@pytest.fixture(scope="module")
def resnet50_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _one_step_run(tmp_path_factory.mktemp("export") / "simclr_r50", "simclr_synth",
                         "model.backbone=resnet50", "model.small_stem=false", "data.image_size=32")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _one_step_run(tmp_path_factory.mktemp("export") / "dino_vit", "dino_synth",
                         "model.backbone=vit_tiny", "model.depth=2", "model.drop_path=0.1")


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """ResNet-10 at 16 px, so the small-image stem; the EMA classifier is the evaluated one."""
    return _one_step_run(tmp_path_factory.mktemp("export") / "supervised", "supervised_synth",
                         "model.backbone=resnet10", "model.depth=null", "model.drop_path=0.0",
                         "method.ema_decay=0.9")


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory: pytest.TempPathFactory, supervised_run: Run) -> Run:
    """The lead's linear probe with its feature BN (GlobalBatchNorm, affine=False) before its Linear."""
    return _one_step_run(tmp_path_factory.mktemp("export") / "linear", "eval/linear_synth",
                         f"method.source={supervised_run.dir}", "method.feature_bn=true", "method.cache_features=false")


@pytest.fixture(scope="module")
def resnet50_export(resnet50_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sslforge export RUN OUT` (the CLI's own code, in this process)."""
    out, printed = tmp_path_factory.mktemp("export") / "r50_export", io.StringIO()
    with redirect_stdout(printed):
        assert main(["export", str(resnet50_run.dir), str(out)]) == 0
    assert "(resnet50, encoder only)" in printed.getvalue() and "model.load_state_dict" in printed.getvalue()
    return out


@pytest.fixture(scope="module")
def supervised_export(supervised_run: Run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "supervised_export"
    return out, export_run(supervised_run.dir, out)


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _small_stem_resnet10(num_classes: int) -> ResNet:
    """torchvision's ResNet-10 with the stem backbones.py builds for small images, written here."""
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _load_recipe(meta: dict) -> nn.Module:
    """The model export.json's `load_python` builds, run as a user would paste it."""
    namespace: dict = {}
    exec(meta["load_python"], namespace)
    return namespace["model"]


# ---------------------------------------------------------------- ResNet-50 through the CLI
def test_resnet50_loads_strictly_into_torchvision_resnet50(resnet50_run: Run, resnet50_export: Path) -> None:
    weights = torch.load(resnet50_export / "model.pt", weights_only=True)
    assert type(weights) is dict and not any(k.startswith("fc.") for k in weights)
    model = torchvision.models.resnet50()
    model.fc = nn.Identity()
    model.load_state_dict(weights, strict=True)
    x = _images(32)
    expected = _outputs(resnet50_run.method.encoder(), x)
    assert expected.shape == (3, 2048)
    torch.testing.assert_close(_outputs(model, x), expected, atol=ATOL, rtol=0)
    safetensors = load_file(str(resnet50_export / "model.safetensors"))
    assert safetensors.keys() == weights.keys()
    assert all(torch.equal(safetensors[k], weights[k]) for k in weights)


def test_export_json_describes_the_run(resnet50_run: Run, resnet50_export: Path) -> None:
    meta = json.loads((resnet50_export / "export.json").read_text())
    cfg = load_resolved(resnet50_run.dir / "config.yaml")
    latest = (resnet50_run.dir / "checkpoints" / "latest").read_text().strip()
    assert (meta["method"], meta["run_name"], meta["step"]) == (cfg.method.name, cfg.name, int(latest[5:]))
    assert meta["checkpoint"] == str((resnet50_run.dir / "checkpoints" / latest).resolve())
    assert meta["run_dir"] == str(resnet50_run.dir.resolve())
    assert meta["weights"] == {"pytorch": "model.pt", "safetensors": "model.safetensors"}
    model = meta["model"]
    assert (model["constructor"], model["args"], model["kwargs"]) == ("torchvision.models.resnet50", [], {})
    assert model["replace"] == {"fc": "torch.nn.Identity()"}
    assert (model["feature_dim"], model["num_classes"], model["small_stem"]) == (2048, None, False)
    assert meta["preprocessing"] == eval_preprocessing(cfg.data.image_size)


@pytest.mark.parametrize("size, image", [(16, (40, 30)), (224, (300, 200))])
def test_preprocessing_is_what_the_eval_transform_does(size: int, image: tuple[int, int]) -> None:
    """The JSON's steps, done by hand with PIL and numpy, give build_eval_transform's tensor."""
    p = eval_preprocessing(size)
    assert p["interpolation"] == "bicubic" and p["antialias"] and p["color"] == "RGB"
    assert p["input_size"] == [3, size, size]
    pixels = np.random.default_rng(0).integers(0, 256, (image[1], image[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    expected = build_eval_transform(size)(img)
    s, (w, h) = p["resize_shorter_side"], img.size
    resized = img.resize((int(s * w / h), s) if h <= w else (s, int(s * h / w)), Image.Resampling.BICUBIC)
    ch, cw = p["center_crop"]
    top, left = round((resized.height - ch) / 2), round((resized.width - cw) / 2)
    crop = np.asarray(resized.crop((left, top, left + cw, top + ch)), dtype=np.float32) / 255
    by_hand = torch.from_numpy((crop - np.float32(p["mean"])) / np.float32(p["std"])).permute(2, 0, 1)
    assert p["crop_pct"] == ch / s
    torch.testing.assert_close(by_hand, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- ViT: timm.create_model
def test_vit_loads_strictly_into_timm_create_model(vit_run: Run, tmp_path: Path) -> None:
    meta = export_run(vit_run.dir, tmp_path / "out")
    model_meta = meta["model"]
    assert model_meta["args"] == ["vit_tiny_patch16_224"]
    assert model_meta["kwargs"] == {"num_classes": 0, "img_size": 16, "patch_size": 4, "depth": 2,
                                    "dynamic_img_size": True, "dynamic_img_pad": True}
    model = timm.create_model(*model_meta["args"], **model_meta["kwargs"])
    model.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)
    x = _images(16)
    teacher = _outputs(vit_run.method.teacher.backbone, x)  # DINO evaluates its teacher
    torch.testing.assert_close(_outputs(model, x), teacher, atol=ATOL, rtol=0)
    assert (_outputs(vit_run.method.student.backbone, x) - teacher).abs().max() > 1e-4  # the student is another network
    assert model_meta["feature_dim"] == 192 == teacher.shape[1]


# ---------------------------------------------------------------- heads
def test_supervised_run_exports_its_head_as_fc(supervised_run: Run, supervised_export: tuple[Path, dict]) -> None:
    out, meta = supervised_export
    weights = torch.load(out / "model.pt", weights_only=True)
    stock = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    with pytest.raises(RuntimeError, match="conv1.weight"):  # the small stem does not fit a stock model
        stock.load_state_dict(weights, strict=True)
    model = _small_stem_resnet10(num_classes=10)
    model.load_state_dict(weights, strict=True)
    x = _images(16)
    logits = _outputs(supervised_run.method.classifier(), x)  # the EMA classifier
    torch.testing.assert_close(_outputs(model, x), logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(_outputs(_load_recipe(meta), x), logits, atol=ATOL, rtol=0)
    assert (meta["model"]["num_classes"], meta["model"]["small_stem"]) == (10, True)
    assert meta["model"]["head_batchnorm_folded"] is False


def test_no_head_exports_the_encoder_alone(supervised_run: Run, tmp_path: Path) -> None:
    meta = export_run(supervised_run.dir, tmp_path / "out", head=False)
    model = _small_stem_resnet10(num_classes=1000)
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True), strict=True)
    x = _images(16)
    expected = _outputs(supervised_run.method.classifier().backbone, x)
    torch.testing.assert_close(_outputs(model, x), expected, atol=ATOL, rtol=0)
    assert meta["model"]["num_classes"] is None and meta["model"]["feature_dim"] == 512


def test_linear_probe_head_is_folded_into_fc(linear_run: Run, supervised_run: Run, tmp_path: Path) -> None:
    meta = export_run(linear_run.dir, tmp_path / "out")
    probe = linear_run.method.classifier()
    bn = probe.head[0]
    assert not bn.affine and bn.running_mean.abs().max() > 0.01  # statistics the fold must use
    model = _small_stem_resnet10(num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True), strict=True)
    x = _images(16)
    torch.testing.assert_close(_outputs(model, x), _outputs(probe, x), atol=ATOL, rtol=0)
    assert meta["model"]["head_batchnorm_folded"] is True
    assert meta["method"] == "linear" and Path(meta["method_source"]) == supervised_run.dir


@pytest.mark.parametrize("affine", [False, True])
def test_fold_equals_batchnorm_then_linear(affine: bool) -> None:
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(6, eps=1e-6, affine=affine)
    bn.running_mean.copy_(torch.randn(6, generator=g) * 3)
    bn.running_var.copy_(torch.rand(6, generator=g) * 4 + 0.1)
    if affine:
        nn.init.normal_(bn.weight, generator=g)
        nn.init.normal_(bn.bias, generator=g)
    head = nn.Sequential(bn, nn.Linear(6, 4)).eval()
    x = torch.randn(5, 6, generator=g) * 3 + 1
    with torch.no_grad():
        expected = head(x)
        folded = fold_linear_head(head)(x)
    torch.testing.assert_close(folded, expected, atol=ATOL, rtol=0)


def test_a_head_that_is_not_linear_is_refused() -> None:
    with pytest.raises(ExportError, match="--no-head"):
        fold_linear_head(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("recipe, overrides, message", [
    ("stl_labeler_synth", ["model.depth=1"], r"backbone fan_tiny_hybrid \(model.backbone\): FAN has no"),
    ("vae_synth", [], r"encoder is a PosteriorMean, not a torchvision ResNet or a timm VisionTransformer"),
])
def test_an_encoder_with_no_library_model_is_refused(recipe: str, overrides: list[str], message: str) -> None:
    cfg = load_config(recipe, overrides)
    with pytest.raises(ExportError, match=message):
        describe(cfg, build_method(cfg))


def _cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """`sslforge export ARGS` in this process: exit 2 and one line on stderr, returned."""
    assert main(["export", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_sources_are_one_line(capsys: pytest.CaptureFixture, supervised_run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    assert f"no run directory (with config.yaml) at or above {missing}" in _cli_error(
        capsys, str(missing), str(tmp_path / "out"))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((supervised_run.dir / "config.yaml").read_text())
    assert "no loadable checkpoint" in _cli_error(capsys, str(untrained), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_needs_force(capsys: pytest.CaptureFixture, supervised_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _cli_error(capsys, str(supervised_run.dir), str(out))
    assert f"export directory {out} is not empty" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["export", str(supervised_run.dir), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.pt", "model.safetensors", "notes.txt"]
    assert "note: the small-image stem (model.small_stem)" in capsys.readouterr().out
