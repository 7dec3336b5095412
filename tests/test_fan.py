"""FAN backbones (models/fan.py) through `build_backbone`, and per-token outputs (models/tokens.py):
the published sizes and parameter counts, every crop size, the class token and the token grid,
the Fourier position encoding and the channel processing against transcriptions of the paper's
formulas, FAN's initialisation, stochastic depth, gradients, and the configuration checks."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.models.xcit import ClassAttentionBlock

from sslforge.config import ModelConfig
from sslforge.models import fan
from sslforge.models.backbones import BACKBONES, FAN_TOKEN_STRIDES, build_backbone, check_model_config
from sslforge.models.tokens import forward_tokens, token_stride
from tests.test_backbones import assert_random_in_train_mode_only

FANS = ("fan_tiny", "fan_small", "fan_base", "fan_tiny_hybrid", "fan_small_hybrid", "fan_base_hybrid")


def model_cfg(backbone: str, **keys: Any) -> Any:
    return OmegaConf.structured(ModelConfig(backbone=backbone, **keys))


def shallow(backbone: str, image_size: int = 32, **keys: Any) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(model_cfg(backbone, depth=1, **keys), image_size)[0]


# NVlabs/FAN README (#Params, with the 1000-class head) and models/fan.py (width, blocks, heads)
@pytest.mark.parametrize("name,dim,depth,heads,million", [
    ("fan_tiny", 192, 12, 4, 7.3), ("fan_small", 384, 12, 8, 28.0), ("fan_base", 448, 18, 8, 54.0),
    ("fan_tiny_hybrid", 192, 8, 8, 7.4), ("fan_small_hybrid", 384, 10, 8, 26.3),
    ("fan_base_hybrid", 448, 16, 8, 50.4)])
def test_published_sizes_and_parameter_counts(name: str, dim: int, depth: int, heads: int, million: float) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        net, out_dim = build_backbone(model_cfg(name), 224)
    assert out_dim == dim == net.embed_dim and len(net.blocks) == depth and net.token_stride == 16
    assert {b.attn.num_heads for b in net.blocks} | {b.mlp.num_heads for b in net.blocks} == {heads}
    assert len(net.cls_attn_blocks) == 2 and all(isinstance(b, ClassAttentionBlock) and b.tokens_norm
                                                 for b in net.cls_attn_blocks)
    count = sum(p.numel() for p in net.parameters()) + dim * 1000 + 1000  # + the classifier
    assert abs(count / 1e6 - million) / million < 0.03, count


@pytest.mark.parametrize("name", FANS)
def test_every_fan_gives_batch_by_dim_on_small_images(name: str) -> None:
    net = shallow(name).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, net.embed_dim) and torch.isfinite(out).all()
    assert name in BACKBONES and len(net.blocks) == 1 and token_stride(net) == 4


@pytest.mark.parametrize("name", ["fan_tiny", "fan_tiny_hybrid"])
def test_one_fan_takes_every_multicrop_size(name: str) -> None:
    net = shallow(name).eval()
    with torch.no_grad():
        for size in (32, 16, 8):
            cls, tokens = forward_tokens(net, torch.randn(2, 3, size, size))
            assert cls.shape == (2, 192) and tokens.shape == (2, size // 4, size // 4, 192)
        # a side that is not a multiple of the stride is zero-padded at the bottom and right
        x = torch.randn(2, 3, 14, 14)
        torch.testing.assert_close(net(x), net(F.pad(x, (0, 2, 0, 2))))


@pytest.mark.parametrize("name,image_size,keys,stride", [
    ("fan_tiny", 32, {}, 4), ("fan_small_hybrid", 32, {}, 4), ("fan_tiny_hybrid", 224, {}, 16),
    ("fan_tiny", 64, {"patch_size": 8}, 8), ("vit_tiny", 32, {}, 4), ("vit_tiny", 224, {}, 16)])
def test_forward_tokens_class_token_is_forward_and_grid_is_input_over_stride(
        name: str, image_size: int, keys: dict, stride: int) -> None:
    net = shallow(name, image_size, **keys).eval()
    x = torch.randn(2, 3, 2 * stride, 3 * stride)  # not square: rows and columns must not swap
    with torch.no_grad():
        cls, tokens = forward_tokens(net, x)
        torch.testing.assert_close(cls, net(x), rtol=0, atol=0)
    assert token_stride(net) == stride and tokens.shape == (2, 2, 3, net.embed_dim)
    if name.startswith("vit"):  # timm's tokens after the final norm: class token, then row-major patches
        with torch.no_grad():
            torch.testing.assert_close(tokens.flatten(1, 2), net.forward_features(x)[:, 1:])


@pytest.mark.parametrize("name", ["fan_tiny", "fan_tiny_hybrid"])
def test_patch_tokens_are_in_image_layout(name: str) -> None:
    """With the FAN blocks silenced (layer scales 0) the class-attention blocks and the norm act on
    each patch token alone, so a token changes with its own image region: a change in the top-right
    4x4 pixels moves token (0, 2) most and leaves the bottom-left token (1, 0) alone."""
    net = shallow(name, 32).eval()
    with torch.no_grad():
        for block in net.blocks:
            block.gamma1.zero_(), block.gamma2.zero_()
        x = torch.randn(1, 3, 8, 12)
        y = x.clone()
        y[..., 0:4, 8:12] += 1.0
        change = (forward_tokens(net, y)[1] - forward_tokens(net, x)[1]).norm(dim=-1)[0]
    assert change.shape == (2, 3) and divmod(int(change.argmax()), 3) == (0, 2)
    if name == "fan_tiny":  # the conv stem's receptive field is local; ConvNeXt's 7x7 convs reach far
        assert change[1, 0] == 0


def test_hybrid_on_32_px_images_gives_8x8_tokens() -> None:
    net = shallow("fan_tiny_hybrid", 32).eval()
    patchify, project = net.patch_embed.stem[0].stride[0], net.patch_embed.proj.stride[0]
    assert patchify * 2 * project == 4  # the ConvNeXt's second stage halves once
    with torch.no_grad():
        assert forward_tokens(net, torch.randn(1, 3, 32, 32))[1].shape[1:3] == (8, 8)
    big = shallow("fan_tiny_hybrid", 224)
    assert (big.patch_embed.stem[0].stride[0], big.patch_embed.proj.stride[0]) == (4, 2)  # as published


def test_forward_tokens_refuses_a_resnet() -> None:
    net, _ = build_backbone(model_cfg("resnet10"), 32)
    with pytest.raises(TypeError, match="ResNet"):
        forward_tokens(net, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="ResNet"):
        token_stride(net)


def test_conv_patch_stem_widths_are_the_published_ones() -> None:
    for patch, widths in ((16, [24, 48, 96, 192]), (8, [48, 96, 192]), (4, [48, 192])):
        net = shallow("fan_tiny", 64, patch_size=patch)
        convs = [m for m in net.patch_embed.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == widths and {c.stride for c in convs} == {(2, 2)}
    assert set(FAN_TOKEN_STRIDES) == set(fan.TOKEN_STRIDES)


def fourier_reference(gh: int, gw: int, features: int = 32, temperature: float = 1e4) -> np.ndarray:
    """FAN's PositionalEncodingFourier before the projection, transcribed per token: for the token at
    row r, column c (1-based), y = 2 pi r / gh, x = 2 pi c / gw; features [y part, x part], each
    [sin(a / T^(0/F)), cos(a / T^(0/F)), sin(a / T^(2/F)), cos(a / T^(2/F)), ...]."""
    out = np.zeros((gh * gw, 2 * features))
    for r in range(gh):
        for c in range(gw):
            for part, a in enumerate((2 * math.pi * (r + 1) / gh, 2 * math.pi * (c + 1) / gw)):
                for i in range(features):
                    angle = a / temperature ** (2 * (i // 2) / features)
                    out[r * gw + c, part * features + i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    return out


def test_fourier_position_encoding_matches_the_formula_on_each_grid() -> None:
    pe = fan.FourierPositionEncoding(dim=24)
    weight, bias = pe.token_projection.weight.detach().double().reshape(24, 64), pe.token_projection.bias.detach()
    for gh, gw in ((3, 5), (4, 4)):
        want = torch.from_numpy(fourier_reference(gh, gw)) @ weight.T + bias.double()
        torch.testing.assert_close(pe(gh, gw)[0].double(), want, rtol=1e-4, atol=1e-5)


def test_channel_processing_matches_the_formula() -> None:
    """Per head h and channel j: gate = temperature_h * sigmoid(sum_n softmax_n(q)[n, j] *
    mean_j' softmax_n(x)[n, j']); out[n, j] = gate * LN(mlp(x))[n, j]; the MLP is fc1, plus gamma
    times dw-conv(GELU)->BN->dw-conv of it on the grid, fc2."""
    torch.manual_seed(0)
    cp = fan.ChannelProcessing(dim=8, num_heads=2, hidden=12).eval()
    with torch.no_grad():
        cp.temperature.uniform_(0.5, 2.0), cp.mlp_v.gamma.uniform_(0.5, 2.0)
    b, gh, gw, d = 2, 3, 4, 4
    x = torch.randn(b, gh * gw, 8)
    m = cp.mlp_v
    h = m.fc1(x)
    grid = h.transpose(1, 2).reshape(b, 12, gh, gw)
    inner = F.gelu(F.conv2d(grid, m.dwconv.conv1.weight, m.dwconv.conv1.bias, padding=1, groups=12))
    bn = m.dwconv.bn
    inner = (inner - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    inner = inner * bn.weight[:, None, None] + bn.bias[:, None, None]
    inner = F.conv2d(inner, m.dwconv.conv2.weight, m.dwconv.conv2.bias, padding=1, groups=12)
    v = F.layer_norm(m.fc2(h + m.gamma * inner.flatten(2).transpose(1, 2)), (8,), cp.norm_v.weight, cp.norm_v.bias)
    q = cp.q(x)
    want = torch.empty_like(x)
    for head in range(2):
        cols = slice(head * d, (head + 1) * d)
        sq, sk = q[..., cols].softmax(dim=1), x[..., cols].softmax(dim=1)  # over tokens
        gate = torch.sigmoid(torch.einsum("bnj,bn->bj", sq, sk.mean(dim=2))) * cp.temperature[head, 0, 0]
        want[..., cols] = gate[:, None, :] * v[..., cols]
    with torch.no_grad():
        torch.testing.assert_close(cp(x, (gh, gw)), want.detach())


def test_initialisation_is_fans() -> None:
    net = build_backbone(model_cfg("fan_tiny_hybrid", depth=2), 224)[0]
    block = net.blocks[0]
    assert 0.018 < block.attn.qkv.weight.std() < 0.022 and torch.count_nonzero(block.attn.qkv.bias) == 0
    assert 0.018 < net.cls_attn_blocks[0].attn.q.weight.std() < 0.022
    dw = block.mlp.mlp_v.dwconv.conv1.weight  # N(0, 2 / fan_out), fan_out = 3 * 3 * 768 / 768
    assert abs(dw.std().item() - math.sqrt(2 / 9)) < 0.02 and torch.count_nonzero(block.mlp.mlp_v.dwconv.conv1.bias) == 0
    layer_scales = [b.gamma1 for b in (*net.blocks, *net.cls_attn_blocks)] + [block.mlp.temperature]
    assert all(torch.equal(g, torch.ones_like(g)) for g in layer_scales)  # eta = 1.0
    stage = net.patch_embed.stages[1]
    assert torch.allclose(stage.blocks[0].gamma, torch.full_like(stage.blocks[0].gamma, 1e-6))
    assert 0.018 < stage.blocks[0].mlp.fc1.weight.std() < 0.022 and 0.015 < net.cls_token.std() < 0.025


@pytest.mark.parametrize("name", ["fan_tiny", "fan_tiny_hybrid"])
def test_gradient_reaches_every_parameter(name: str) -> None:
    net = shallow(name, 16).train()
    cls, _ = forward_tokens(net, torch.randn(4, 3, 16, 16))
    torch.manual_seed(1)
    (cls * torch.randn_like(cls)).sum().backward()  # the class token alone reaches every weight
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_drop_path_is_every_fan_blocks_rate_in_train_mode_only() -> None:
    net = build_backbone(model_cfg("fan_tiny", depth=2, drop_path=0.5), 16)[0]
    assert [b.drop_path.drop_prob for b in net.blocks] == [0.5, 0.5]  # FAN's rule: not linear
    assert all(isinstance(b.drop_path1, nn.Identity) for b in net.cls_attn_blocks)
    assert_random_in_train_mode_only(net, shallow("fan_tiny", 16))


def test_depth_key_shapes_vits_and_fans() -> None:
    assert len(build_backbone(model_cfg("vit_tiny", depth=2), 32)[0].blocks) == 2
    assert len(shallow("fan_small_hybrid").blocks) == 1


@pytest.mark.parametrize("backbone,keys,named", [
    ("fan_tiny", {"patch_size": 5}, "model.patch_size"),
    ("fan_tiny", {"patch_size": 2}, "model.patch_size"),  # divides 32, but FAN has no stride-2 stem
    ("fan_small_hybrid", {"num_heads": 5}, "model.num_heads"),
    ("fan_tiny", {"depth": 0}, "model.depth"),
    ("vit_tiny", {"depth": -1}, "model.depth"),
    ("resnet18", {"depth": 4}, "model.depth"),
    ("fan_tiny", {"drop_path": 1.0}, "model.drop_path"),
    ("fan_tiny_hybrid", {"small_stem": True}, "model.small_stem"),
    ("fan_tiny", {"vit_init": "dino"}, "model.vit_init"),
    ("fan_base", {"vit_sincos_pos_embed": True}, "model.vit_sincos_pos_embed"),
    ("fan_huge", {}, "model.backbone"),
])
def test_keys_a_fan_cannot_use_are_refused(backbone: str, keys: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named) as err:
        check_model_config(model_cfg(backbone, **keys), 32)
    if backbone == "fan_huge":
        assert all(name in str(err.value) for name in FANS)
