"""Apply one channel permutation to every tensor of a channel space (in place, parameters keep their
identity so an optimizer built on them stays valid).

``perm`` maps new channel j to old channel ``perm[j]``. Producers: Conv/Linear weight dim 0 and
bias, Embedding weight dim 1. Consumers: Conv/Linear weight dim 1 (for a convolution: one
permutation of its input channels, the same at every kernel position). BatchNorm: weight, bias,
running mean and variance. LayerNorm: weight and bias. Depthwise conv: weight dim 0 and bias (its
input and output channels are the same channels). Parameters tied by an elementwise op: along
their channel dim.
"""

from __future__ import annotations

import torch
from torch import nn

from nmsparse.permute.graph import Space


def _take(t: torch.Tensor | None, dim: int, perm: torch.Tensor) -> None:
    if t is None:
        return
    with torch.no_grad():
        t.copy_(t.index_select(dim, perm.to(t.device)))


def _tensor(model: nn.Module, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def apply_space(model: nn.Module, space: Space, perm: torch.Tensor) -> None:
    """Permute every tensor of ``space`` by ``perm`` (LongTensor of ``space.size`` channels)."""
    mods = dict(model.named_modules())
    for name in space.producers:
        mod = mods[name]
        if isinstance(mod, nn.Embedding):
            _take(mod.weight, 1, perm)
        else:
            _take(mod.weight, 0, perm)
            _take(getattr(mod, "bias", None), 0, perm)
    for name in space.consumers:
        _take(mods[name].weight, 1, perm)
    for kind, name, dim in space.members:
        if kind == "param":
            _take(_tensor(model, name), dim, perm)
            continue
        mod = mods[name]
        _take(getattr(mod, "weight", None), 0, perm)
        _take(getattr(mod, "bias", None), 0, perm)
        if kind == "bn":
            _take(mod.running_mean, 0, perm)
            _take(mod.running_var, 0, perm)
