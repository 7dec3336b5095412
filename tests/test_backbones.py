"""Backbones: timm ViTs at the sizes multi-crop feeds them, MoCo v3's frozen patch projection and
sin-cos position embedding, drop-path, the name and key checks, and ResNets as they were."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.models import resnet

from sslforge.config import ModelConfig, load_config
from sslforge.methods import method_class
from sslforge.models.backbones import BACKBONES, build_backbone


def model_cfg(backbone: str = "vit_tiny", **keys: Any) -> Any:
    return OmegaConf.structured(ModelConfig(backbone=backbone, **keys))


@pytest.fixture(scope="module")
def vit32() -> nn.Module:
    """ViT-Tiny for 32 px images (default patch 4), eval mode."""
    torch.manual_seed(0)
    return build_backbone(model_cfg(), 32)[0].eval()


@pytest.mark.parametrize("image_size,patch_size", [(16, None), (32, 4)])
def test_vit_tiny_small_patch_gives_batch_by_dim(image_size: int, patch_size: int | None) -> None:
    net, dim = build_backbone(model_cfg(patch_size=patch_size), image_size)
    assert dim == 192 and net.patch_embed.patch_size == (4, 4)
    assert net.patch_embed.grid_size == (image_size // 4, image_size // 4)
    out = net(torch.randn(3, 3, image_size, image_size))
    assert out.shape == (3, 192) and torch.isfinite(out).all()


def test_vit_patch16_at_224_takes_96_px_crops() -> None:
    net, dim = build_backbone(model_cfg(), 224)
    assert net.patch_embed.patch_size == (16, 16) and net.patch_embed.grid_size == (14, 14)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 224, 224)).shape == (2, dim)
        assert net(torch.randn(2, 3, 96, 96)).shape == (2, dim)


def test_one_vit_takes_every_multicrop_size(vit32: nn.Module) -> None:
    with torch.no_grad():
        for size in (32, 16, 12, 8):
            assert vit32(torch.randn(2, 3, size, size)).shape == (2, 192)
        # a side that is not a multiple of the patch is zero-padded at the bottom and right
        x = torch.randn(2, 3, 14, 14)
        torch.testing.assert_close(vit32(x), vit32(F.pad(x, (0, 2, 0, 2))))


def test_output_is_the_normalised_class_token(vit32: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit32.forward_features(x)  # after the final LayerNorm
        assert tokens.shape == (2, 1 + 8 * 8, 192)
        torch.testing.assert_close(vit32(x), tokens[:, 0])


@pytest.mark.parametrize("name,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_vit_sizes_are_the_published_ones(name: str, dim: int, heads: int) -> None:
    net, out_dim = build_backbone(model_cfg(name), 32)
    assert out_dim == dim == net.embed_dim and len(net.blocks) == 12
    assert {b.attn.num_heads for b in net.blocks} == {heads}
    assert net.blocks[0].mlp.fc1.out_features == 4 * dim and net.blocks[0].attn.qkv.bias is not None


def test_num_heads_overrides_the_standard() -> None:
    """MoCo v3's ViT-S: 12 heads of width 32 instead of 6 of 64."""
    net, _ = build_backbone(model_cfg("vit_small", num_heads=12), 32)
    assert {(b.attn.num_heads, b.attn.head_dim) for b in net.blocks} == {(12, 32)}


def moco_v3_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """moco-v3 vits.py's build_2d_sincos_position_embedding, transcribed: a zero class-token
    row, then per patch [sin(a w), cos(a w), sin(b w), cos(b w)] with (a, b) from meshgrid(w, h)
    in 'ij' order and w_k = temperature^(-k / (dim / 4))."""
    grid_a, grid_b = torch.meshgrid(torch.arange(w, dtype=torch.float32),
                                    torch.arange(h, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_a = grid_a.flatten()[:, None] * omega[None, :]
    out_b = grid_b.flatten()[:, None] * omega[None, :]
    patches = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), patches])[None]


def test_moco_v3_frozen_patch_embed_and_sincos_position_embedding() -> None:
    torch.manual_seed(0)
    cfg = model_cfg(vit_frozen_patch_embed=True, vit_sincos_pos_embed=True)
    net, dim = build_backbone(cfg, 32)
    proj = net.patch_embed.proj
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    torch.testing.assert_close(net.pos_embed, moco_v3_sincos(8, 8, dim), rtol=0, atol=1e-6)
    # the published random projection: uniform +-sqrt(6 / (3 p^2 + D)), zero bias
    bound = math.sqrt(6.0 / (3 * 4 * 4 + dim))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.95 * bound
    assert torch.count_nonzero(proj.bias) == 0
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert proj.weight.grad is None and net.pos_embed.grad is None
    assert net.blocks[0].attn.qkv.weight.grad is not None


def test_moco_and_dino_initialisations() -> None:
    moco, dim = build_backbone(model_cfg(vit_init="moco"), 32)
    qkv, fc1 = moco.blocks[0].attn.qkv, moco.blocks[0].mlp.fc1
    for weight, bound in ((qkv.weight, math.sqrt(6.0 / (dim + dim))),  # q, k, v each D -> D
                          (fc1.weight, math.sqrt(6.0 / (dim + 4 * dim)))):  # xavier-uniform
        assert 0.95 * bound < weight.abs().max() <= bound
    assert torch.count_nonzero(qkv.bias) == 0 and moco.cls_token.std() < 1e-5
    assert moco.patch_embed.proj.weight.abs().max() <= math.sqrt(6.0 / (3 * 16 + dim))
    assert moco.patch_embed.proj.weight.requires_grad  # initialised as MoCo v3, not frozen
    dino, _ = build_backbone(model_cfg(vit_init="dino"), 32)
    assert 0.015 < dino.cls_token.std() < 0.025
    assert 0.015 < dino.blocks[0].mlp.fc1.weight.std() < 0.025


def test_drop_path_is_stochastic_depth_in_train_mode_only() -> None:
    torch.manual_seed(0)
    net, _ = build_backbone(model_cfg(drop_path=0.5), 16)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in net.blocks]  # rate 0: Identity
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.5, 12))  # DINO's rule
    assert_random_in_train_mode_only(net, build_backbone(model_cfg(), 16)[0])


def assert_random_in_train_mode_only(net: torch.nn.Module, plain: torch.nn.Module) -> None:
    """`net` (with drop-path) differs between two forwards in train mode only; `plain` (the same
    without) never does."""
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        net.train()
        assert not torch.allclose(net(x), net(x))
        net.eval()
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
        plain.train()
        torch.testing.assert_close(plain(x), plain(x), rtol=0, atol=0)


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        build_backbone(model_cfg("vit_smal"), 32)
    assert "vit_smal" in str(err.value)
    for name in ("vit_tiny", "vit_small", "vit_base", "resnet10", "resnet50", "resnet101"):
        assert name in BACKBONES and name in str(err.value)


@pytest.mark.parametrize("backbone,keys,named", [
    ("resnet18", {"drop_path": 0.1}, "model.drop_path"),
    ("resnet18", {"patch_size": 4}, "model.patch_size"),
    ("resnet18", {"vit_sincos_pos_embed": True}, "model.vit_sincos_pos_embed"),
    ("vit_tiny", {"small_stem": True}, "model.small_stem"),
    ("vit_tiny", {"patch_size": 5}, "model.patch_size"),
    ("vit_tiny", {"num_heads": 5}, "model.num_heads"),
    ("vit_tiny", {"drop_path": 1.0}, "model.drop_path"),
    ("vit_tiny", {"vit_init": "jax"}, "model.vit_init"),
])
def test_keys_a_backbone_cannot_use_are_refused(backbone: str, keys: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_backbone(model_cfg(backbone, **keys), 32)


def reference_resnet18(small_stem: bool) -> nn.Module:
    """torchvision's ResNet-18 with the classifier removed, and the CIFAR stem, built by hand."""
    net = resnet.resnet18(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


@pytest.mark.parametrize("image_size,small_stem,expect_small", [(32, None, True), (224, None, False),
                                                               (32, False, False)])
def test_resnet_is_torchvision_as_before(image_size: int, small_stem: bool | None, expect_small: bool) -> None:
    torch.manual_seed(0)
    net, dim = build_backbone(model_cfg("resnet18", small_stem=small_stem), image_size)
    torch.manual_seed(0)
    ref = reference_resnet18(expect_small)
    got, want = net.state_dict(), ref.state_dict()
    assert dim == 512 and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def simclr(*overrides: str) -> nn.Module:
    cfg = load_config("simclr_synth", ["data.image_size=16", "model.proj_hidden_dim=32",
                                       "model.proj_output_dim=16", *overrides])
    return method_class("simclr")(cfg)


def test_simclr_state_dict_keys_unchanged() -> None:
    """The keys of existing checkpoints: torchvision's ResNet-10 and a Linear-BN-ReLU-Linear head."""
    method = simclr("model.backbone=resnet10")
    backbone = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    backbone.conv1, backbone.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    backbone.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
    want = {**{f"backbone.{k}": v.shape for k, v in backbone.state_dict().items()},
            **{f"projector.{k}": v.shape for k, v in head.state_dict().items()}}
    assert {k: v.shape for k, v in method.state_dict().items()} == want


def test_simclr_trains_a_vit_from_the_config() -> None:
    method = simclr("model.backbone=vit_tiny", "model.drop_path=0.1")
    assert method.backbone.patch_embed.patch_size == (4, 4)
    assert method.projector[0].in_features == 192
    out = method.training_step({"views": [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]}, 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and method.backbone.cls_token.grad is not None
