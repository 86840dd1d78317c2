"""Network-level acceptance of channel permutations (``accept="network"``).

The layer-wise checks (kept score, each layer's own calibration output error) do not see how the
errors of many pruned layers compound through the network. Here a candidate permutation is judged by
the whole pruned network on the calibration data:

* the *pruned network* of a set of permutations: every sparse layer's weight multiplied by its N:M
  keep-mask (N kept per M) of its score (``|w|``, or the Wanda score ``|w| * ||x||``) after its
  input channels are reordered by its space's permutation (mapped back to the model's own channel
  order, which is the same network since the permutation preserves the function); layers of
  unpermuted spaces take their plain mask. For ``method="magnitude"`` this is exactly the network
  ``nmsparse.prune(method="magnitude")`` produces from the permuted model (ties aside);
* its *calibration objective*: the relative squared error of the model's outputs on the calibration
  inputs against the dense model's, ``sum ||y - y_dense||^2 / sum ||y_dense||^2`` over every output
  tensor of every batch;
* the greedy rule: start from no permutation; for each searched channel space in order, try each
  candidate permutation (one per local search, ``tries``) on top of the choices so far and keep the
  one with the lowest objective if it is strictly lower than the current one. Every accepted step
  lowers the objective, so the final one is never above the unpermuted one (on that data).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from nmsparse.masking.layout import layer_mask
from nmsparse.permute.calib_check import run


def weight_score(module: nn.Module, norms: torch.Tensor | None) -> torch.Tensor:
    """Score of every weight, shaped like ``module.weight`` (float64): ``|w|``, times the input
    norms (shaped like ``weight.shape[1:]``) for Wanda."""
    w = module.weight.detach().to(torch.float64).abs()
    return w if norms is None else w * norms.to(w).view(1, *w.shape[1:])


def keep_mask(module: nn.Module, score: torch.Tensor, perm: torch.Tensor | None, n: int, m: int,
              layout: str) -> torch.Tensor:
    """Bool N:M keep-mask of ``module.weight`` (its shape, the model's channel order) when its input
    channels are first reordered by ``perm`` (None: as they are). Weights that are already zero stay
    pruned (as ``prune(keep_zeros=True)``)."""
    s = score if perm is None else score[:, perm]
    mask = layer_mask(s, n, m, layout)
    if perm is not None:
        mask = torch.empty_like(mask).index_copy_(1, perm, mask)
    return mask & (module.weight.detach() != 0).to(mask.device)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if hasattr(x, "to_tuple"):  # transformers' ModelOutput
        return _tensors(x.to_tuple())
    return []


class NetworkObjective:
    """The relative output error of a pruned copy of ``model``'s function on ``calib``, against the
    outputs ``model`` has now (its dense outputs, computed once and kept: memory = the outputs of
    every calibration batch)."""

    def __init__(self, model: nn.Module, calib: Iterable):
        from nmsparse.calibration.collect import _inputs  # a calibration item's inputs, as prune reads them

        self.model = model
        self.batches = [_inputs(b) for b in calib]
        if not self.batches:
            raise ValueError("calib is empty: give at least one input batch")
        self.reference = [[t.detach() for t in _tensors(run(model, b))] for b in self.batches]
        self.evaluations = 0

    def evaluate(self, model: nn.Module) -> float:
        """Relative output error of ``model`` (same function family, e.g. a pruned copy) on the
        calibration batches against the reference outputs."""
        num = den = 0.0
        with torch.no_grad():
            for b, ref in zip(self.batches, self.reference):
                out = _tensors(run(model, b))
                if len(out) != len(ref):
                    raise RuntimeError(f"the model returned {len(out)} output tensors, the reference {len(ref)}")
                for y, r in zip(out, ref):
                    if y.is_floating_point():
                        num += float((y.double() - r.double()).pow(2).sum())
                        den += float(r.double().pow(2).sum())
        return num / den if den > 0 else num

    def __call__(self, masks: dict[nn.Module, torch.Tensor]) -> float:
        """Objective of the network whose listed modules have their weight multiplied by the mask;
        the weights are restored exactly afterwards."""
        saved = {mod: mod.weight.detach().clone() for mod in masks}
        try:
            with torch.no_grad():
                for mod, mask in masks.items():
                    mod.weight.mul_(mask.to(mod.weight.device, mod.weight.dtype))
            value = self.evaluate(self.model)
        finally:
            with torch.no_grad():
                for mod, w in saved.items():
                    mod.weight.copy_(w)
        self.evaluations += 1
        return value


def accept_greedy(objective: NetworkObjective, layers: dict[str, tuple[nn.Module, torch.Tensor]],
                  space_layers: dict[int, list[str]], candidates: dict[int, list[torch.Tensor]],
                  n: int, m: int, layout: str) -> tuple[dict[int, torch.Tensor], dict[int, tuple[float, float]], float, float]:
    """Greedy network-level choice. ``layers``: every sparse layer (name -> (module, weight-shaped
    score)); ``space_layers``: the searched layers of each candidate space (in the order to decide);
    ``candidates``: each space's candidate permutations. Returns the accepted permutations, for each
    decided space the objective before its decision and with its best candidate, and the objective
    of the unpermuted pruned network and of the chosen one (never above it)."""
    masks = {mod: keep_mask(mod, s, None, n, m, layout) for mod, s in layers.values()}
    current = base = objective(masks)
    chosen: dict[int, torch.Tensor] = {}
    trace: dict[int, tuple[float, float]] = {}
    for sid, names in space_layers.items():
        best = None
        for perm in candidates.get(sid, []):
            trial = dict(masks)
            for name in names:
                mod, s = layers[name]
                trial[mod] = keep_mask(mod, s, perm, n, m, layout)
            value = objective(trial)
            if best is None or value < best[0]:
                best = (value, perm, trial)
        if best is None:
            continue
        trace[sid] = (current, best[0])
        if best[0] < current:
            current, chosen[sid], masks = best[0], best[1], best[2]
    return chosen, trace, base, current
