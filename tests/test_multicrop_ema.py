"""Multi-crop forward (one backbone call per resolution, features in crop order) and the EMA
helpers (momentum copy, parameter update by the formula, mismatches refused)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from sslforge.config import ModelConfig
from sslforge.models.backbones import build_backbone
from sslforge.models.ema import ema_update_, momentum_copy
from sslforge.models.heads import DINOHead
from sslforge.models.multicrop import forward_multicrop


class CallLog(nn.Module):
    """Wraps a backbone and records the input shape of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def test_multicrop_equals_per_crop_forwards_with_one_call_per_run() -> None:
    torch.manual_seed(0)
    vit, dim = build_backbone(OmegaConf.structured(ModelConfig(backbone="vit_tiny")), 32)
    backbone = CallLog(vit.eval())
    b = 2
    sizes = [32, 32, 16, 16, 16, 32]  # the last crop starts a new run: order is kept
    crops = [torch.randn(b, 3, s, s) for s in sizes]
    with torch.no_grad():
        got = forward_multicrop(backbone, crops)
        want = torch.cat([vit(c) for c in crops])
    assert backbone.calls == [(2 * b, 3, 32, 32), (3 * b, 3, 16, 16), (b, 3, 32, 32)]
    assert got.shape == (len(sizes) * b, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_multicrop_calls_the_backbone_once_per_resolution_run() -> None:
    backbone = CallLog(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    crops = [torch.randn(2, 3, s, s) for s in (24, 24, 8, 8, 8, 24)]
    out = forward_multicrop(backbone, crops)
    assert backbone.calls == [(4, 3, 24, 24), (6, 3, 8, 8), (2, 3, 24, 24)]
    torch.testing.assert_close(out, torch.cat([backbone.inner(c) for c in crops]))


def test_multicrop_refuses_no_crops() -> None:
    with pytest.raises(ValueError, match="at least one crop"):
        forward_multicrop(nn.Identity(), [])


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_momentum_copy_is_an_independent_frozen_copy() -> None:
    online = small_net()
    target = momentum_copy(online)
    assert all(p.requires_grad for p in online.parameters())
    assert not any(p.requires_grad for p in target.parameters())
    for (name, a), (_, b) in zip(online.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


@pytest.mark.parametrize("momentum", [0.0, 0.996, 1.0])
def test_ema_update_is_the_formula_on_parameters_only(momentum: float) -> None:
    torch.manual_seed(0)
    online, target = small_net(), small_net()
    with torch.no_grad():
        target[1].running_mean.fill_(3.0)
    before_t = {k: v.clone() for k, v in target.named_parameters()}
    before_o = {k: v.clone() for k, v in online.state_dict().items()}
    buffers = {k: v.clone() for k, v in target.named_buffers()}
    ema_update_(target, online, momentum)
    for name, param in target.named_parameters():
        want = momentum * before_t[name] + (1.0 - momentum) * before_o[name]
        torch.testing.assert_close(param, want, rtol=1e-6, atol=1e-7)
    for name, buffer in target.named_buffers():
        assert torch.equal(buffer, buffers[name]), name  # running stats are the target's own
    assert all(torch.equal(v, before_o[k]) for k, v in online.state_dict().items())


def test_ema_update_follows_a_weight_normalised_head() -> None:
    """DINO's teacher head: parametrised weights are matched by name like any parameter."""
    student = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    teacher = momentum_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(teacher, student, 0.5)
    for (name, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        torch.testing.assert_close(t, s - 0.5, msg=name)


def test_ema_update_refuses_mismatched_networks() -> None:
    with pytest.raises(ValueError, match="only in target"):
        ema_update_(small_net(), nn.Sequential(nn.Linear(4, 8)), 0.9)
    wider = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        ema_update_(small_net(), wider, 0.9)
