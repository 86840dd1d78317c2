"""SAD, the Sparse Architecture Divergence (Zhou et al., 2021): how many mask bits flip between two
points of training, ``SAD = || E_1 - E_2 ||_1`` for boolean keep-masks (a pure tensor function;
:mod:`nmsparse.surgery.sad_tracker` follows it over a model's training)."""

from __future__ import annotations

import torch


def sad(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of positions where boolean masks ``a`` and ``b`` (same shape) differ."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"sad needs boolean mask tensors; {name} is {got} (use t != 0 for a weight)")
    if a.shape != b.shape:
        raise ValueError(f"sad needs masks of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return int((a != b.to(a.device)).sum())
