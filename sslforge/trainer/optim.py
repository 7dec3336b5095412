"""Optimisers and their parameter groups: LARS (SimCLR, BYOL, ...), AdamW, SGD.

Biases and normalisation weights are excluded from weight decay and from LARS's trust-ratio
adaptation, as in the SimCLR/BYOL papers and solo-learn.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from omegaconf import DictConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio `eta * |w| / |g + wd w|` (You et al., 2017).

    Groups with `lars_adapt=False` are plain SGD with momentum (and their weight decay is 0).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _is_bias_or_norm(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def split_decay_groups(groups: list[dict[str, Any]], named: dict[int, str], exclude: bool) -> list[dict[str, Any]]:
    """Split each method group into decayed weights and excluded biases/norm weights."""
    out: list[dict[str, Any]] = []
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}
        params = list(group["params"])
        if not exclude or group.get("no_decay"):
            out.append({**extra, "params": params, "no_decay": bool(group.get("no_decay"))})
            continue
        decay = [p for p in params if not _is_bias_or_norm(named[id(p)], p)]
        no_decay = [p for p in params if _is_bias_or_norm(named[id(p)], p)]
        out += [g for g in ({**extra, "params": decay, "no_decay": False},
                            {**extra, "params": no_decay, "no_decay": True}) if g["params"]]
    return out


def build_optimizer(module: torch.nn.Module, groups: list[dict[str, Any]], cfg: DictConfig,
                    lr: float) -> torch.optim.Optimizer:
    """The configured optimiser over `groups`; trainer-only keys stay in each group."""
    named = {id(p): n for n, p in module.named_parameters()}
    groups = split_decay_groups(groups, named, cfg.optim.exclude_bias_and_norm)
    wd = cfg.optim.weight_decay
    for g in groups:
        g["weight_decay"] = 0.0 if g["no_decay"] else wd
        g.setdefault("freeze_steps", 0)
        if cfg.optim.name == "lars":
            g["lars_adapt"] = not g["no_decay"]
    name = cfg.optim.name
    if name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.optim.momentum, eta=cfg.optim.lars_eta)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas))
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum)
