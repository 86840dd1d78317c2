"""SAD, the Sparse Architecture Divergence (Zhou et al., 2021): how many mask bits flip between two
points of training, ``SAD = || E_1 - E_2 ||_1`` for boolean keep-masks."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
from torch import nn


def sad(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of positions where boolean masks ``a`` and ``b`` (same shape) differ."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"sad needs boolean mask tensors; {name} is {got} (use t != 0 for a weight)")
    if a.shape != b.shape:
        raise ValueError(f"sad needs masks of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return int((a != b.to(a.device)).sum())


@dataclasses.dataclass
class SADRecord:
    """One measurement: per layer and in total, counts and fractions of the layer's size."""

    layers: dict[str, dict[str, float]]
    total: dict[str, float]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "total": self.total}


class SADTracker:
    """Tracks SAD during training against the initial mask and against the previous measurement.

    ``source`` is a model (its current N:M masks, :func:`nmsparse.masks`) or a callable returning a
    ``{name: BoolTensor}`` dict, e.g. ``lambda: nmsparse.magnitude_masks(dense_model)`` for a dense run.
    The first masks are taken at construction.
    """

    def __init__(self, source: nn.Module | Callable[[], Mapping[str, torch.Tensor]]) -> None:
        if isinstance(source, nn.Module):
            from nmsparse.sparsify import masks

            model = source
            self._read: Callable[[], Mapping[str, torch.Tensor]] = lambda: masks(model)
        else:
            self._read = source
        self.initial = self._snapshot()
        if not self.initial:
            raise ValueError("SADTracker found no masks: sparsify the model first or pass a mask function")
        self.previous = self.initial
        self.history: list[SADRecord] = []

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self._read().items()}

    def measure(self) -> SADRecord:
        """Compare the current masks with the initial and previous ones; append and return a record."""
        now = self._snapshot()
        if now.keys() != self.initial.keys():
            raise ValueError(f"the set of masks changed: {sorted(self.initial)} vs {sorted(now)}")
        layers = {}
        tot = dict(size=0, vs_initial=0, vs_previous=0)
        for k, mask in now.items():
            size = mask.numel()
            vi, vp = sad(mask, self.initial[k]), sad(mask, self.previous[k])
            layers[k] = dict(size=size, vs_initial=vi, vs_previous=vp,
                             vs_initial_frac=vi / size, vs_previous_frac=vp / size)
            tot["size"] += size
            tot["vs_initial"] += vi
            tot["vs_previous"] += vp
        total = dict(tot, vs_initial_frac=tot["vs_initial"] / tot["size"],
                     vs_previous_frac=tot["vs_previous"] / tot["size"])
        self.previous = now
        record = SADRecord(layers, total)
        self.history.append(record)
        return record
