"""Heads: `mlp` in each published shape, and DINO's head with its weight-normalised last layer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslforge.models.heads import DINOHead, mlp


def layer_kinds(net: nn.Sequential) -> list[tuple[str, bool | None]]:
    """(type, has bias) per layer; bias is None for layers without one."""
    return [(type(m).__name__, m.bias is not None if isinstance(m, nn.Linear) else None) for m in net]


def test_default_mlp_is_simclrs_head_unchanged() -> None:
    """Same layers, state_dict keys and initial values as the head SimCLR checkpoints hold."""
    torch.manual_seed(0)
    got = mlp(8, 16, 4)
    torch.manual_seed(0)
    want = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    assert layer_kinds(got) == layer_kinds(want)
    assert got.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    x = torch.randn(5, 8)
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,want", [
    ({"num_layers": 3, "last_bn": True},  # MoCo v3 / SimSiam projector
     [("Linear", False), ("BatchNorm1d", None), ("ReLU", None), ("Linear", False), ("BatchNorm1d", None),
      ("ReLU", None), ("Linear", False), ("BatchNorm1d", None)]),
    ({"hidden_bias": True},  # BYOL
     [("Linear", True), ("BatchNorm1d", None), ("ReLU", None), ("Linear", True)]),
    ({"batch_norm": False, "hidden_bias": True, "act": nn.GELU},
     [("Linear", True), ("GELU", None), ("Linear", True)]),
    ({"num_layers": 1}, [("Linear", True)]),
])
def test_mlp_options(kwargs: dict, want: list) -> None:
    net = mlp(8, 16, 4, **kwargs)
    assert layer_kinds(net) == want
    assert net(torch.randn(5, 8)).shape == (5, 4)


def test_mlp_last_bn_has_no_affine() -> None:
    last = mlp(8, 16, 4, last_bn=True)[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine


def test_mlp_refuses_zero_layers() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        mlp(8, 16, 4, num_layers=0)


def dino_head(**kwargs) -> DINOHead:  # type: ignore[no-untyped-def]
    return DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, **kwargs)


def test_dino_head_structure_and_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(64, 40, hidden_dim=512, bottleneck_dim=256)
    assert layer_kinds(head.mlp) == [("Linear", True), ("GELU", None), ("Linear", True), ("GELU", None),
                                     ("Linear", True)]
    for linear in head.mlp[::2]:
        assert 0.018 < linear.weight.std() < 0.022 and linear.weight.abs().max() < 0.1
        assert torch.count_nonzero(linear.bias) == 0
    assert layer_kinds(dino_head(batch_norm=True).mlp)[1] == ("BatchNorm1d", None)
    assert layer_kinds(dino_head(num_layers=1).mlp) == [("Linear", True)]


def test_dino_head_forward_is_the_formula() -> None:
    """mlp, L2-normalise, then the last layer with rows g * v / ||v||, computed by hand."""
    torch.manual_seed(0)
    head = dino_head(norm_last_layer=False)
    weights = head.last_layer.parametrizations.weight
    with torch.no_grad():
        weights.original0.uniform_(0.5, 2.0)  # a magnitude other than 1
    g, v = weights.original0.detach(), weights.original1.detach()
    x = torch.randn(6, 12)
    bottleneck = head.mlp(x)
    z = bottleneck / bottleneck.norm(dim=1, keepdim=True)
    want = z @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), want)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), g.squeeze(1))


def test_norm_last_layer_freezes_the_magnitude_at_one() -> None:
    head = dino_head()
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (40, 1) and torch.equal(g, torch.ones_like(g)) and not g.requires_grad
    head(torch.randn(6, 12)).sum().backward()
    assert g.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    free = dino_head(norm_last_layer=False).last_layer.parametrizations.weight.original0
    assert torch.equal(free, torch.ones_like(free)) and free.requires_grad


def test_dino_head_deepcopy_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    head = dino_head()
    x = torch.randn(6, 12)
    teacher = copy.deepcopy(head)
    torch.testing.assert_close(teacher(x), head(x), rtol=0, atol=0)
    assert not teacher.last_layer.parametrizations.weight.original0.requires_grad
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.add_(1.0)
    assert not torch.allclose(teacher(x), head(x))  # the copy owns its tensors
    torch.manual_seed(1)
    fresh = dino_head()
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(x), head(x), rtol=0, atol=0)
    assert F.normalize(fresh.mlp(x), dim=-1).norm(dim=1).allclose(torch.ones(6))
