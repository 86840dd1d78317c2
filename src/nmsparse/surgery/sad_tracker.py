"""SAD over training: :class:`SADTracker` follows a model's N:M masks (or any mask function) and records
per layer how many bits flipped against the first and the previous measurement (:func:`sad`, in
:mod:`nmsparse.masking.divergence`, counts them)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
from torch import nn

from nmsparse.masking.divergence import sad
from nmsparse.surgery.sparse_model import masks


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
