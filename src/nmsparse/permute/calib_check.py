"""What the calibration data says about a channel permutation: each sparse layer's input Gram matrix
``H = sum x x^T`` (over calibration rows; for a convolution over its im2col columns), from which

* the Wanda input norms, ``sqrt(diag H)``, and
* the relative output error an N:M mask causes on the calibration inputs,
  ``||(W - W * mask) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T)`` with ``D = W * (1 - mask)``,

so that a space's permutation can be kept only when it lowers the summed output error of the space's
sparse layers (maximising the kept ``|w|`` is a proxy for that error, not the error itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from nmsparse.permute.graph import CONV


@torch.no_grad()
def input_grams(model: nn.Module, mods: list[nn.Module], calib: Iterable) -> dict[nn.Module, torch.Tensor]:
    """Float64 input Gram matrix ``(F, F)`` of each module of ``mods`` over the calibration batches
    (``F``: in features; for a convolution in_channels x kernel positions, channel-major, the order of
    ``weight.reshape(out, -1)``). Raises ValueError on an empty ``calib``."""
    from nmsparse.calibration.collect import _inputs
    from nmsparse.calibration.geometry import im2col

    grams: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0].detach().to(torch.float64)
        f = im2col(mod, x) if isinstance(mod, CONV) else x.reshape(-1, x.shape[-1])
        h = (f.T @ f).cpu()
        grams[mod] = h if mod not in grams else grams[mod] + h

    handles = [mod.register_forward_pre_hook(hook) for mod in mods]
    try:
        any_batch = False
        for item in calib:
            any_batch = True
            run(model, _inputs(item))
        if not any_batch:
            raise ValueError("calib is empty: give at least one input batch")
    finally:
        for h in handles:
            h.remove()
    return grams


def input_norms(module: nn.Module, gram: torch.Tensor) -> torch.Tensor:
    """Wanda input norms of ``module``'s input columns, shaped like ``weight.shape[1:]``."""
    return gram.diagonal().clamp_min(0).sqrt().view(module.weight.shape[1:])


def output_error(module: nn.Module, gram: torch.Tensor, score: torch.Tensor, perm: torch.Tensor | None,
                 n: int, m: int) -> float:
    """Relative output error on the calibration inputs of ``module`` pruned to N:M (N kept per M) by
    ``score`` ((rows, C) as built by :mod:`nmsparse.permute.channels`: one row per output channel and
    kernel position), after its input channels are reordered by ``perm`` (None: as they are). The
    error does not depend on the order of the channels, only on which channels share a group."""
    w = module.weight.detach().to(torch.float64).cpu()
    c = w.shape[1]
    wf = w.movedim(1, -1).reshape(-1, c)  # rows like score's
    s = score if perm is None else score[:, perm]
    r = s.shape[0]
    top = s.reshape(r, c // m, m).topk(n, dim=2).indices
    keep_p = torch.zeros(r, c // m, m, dtype=torch.bool).scatter_(2, top, True).reshape(r, c)
    keep = keep_p if perm is None else torch.empty_like(keep_p).index_copy_(1, perm, keep_p)
    d = (wf * ~keep).reshape(w.shape[0], *w.shape[2:], c).movedim(-1, 1).reshape(w.shape[0], -1)
    w2 = w.reshape(w.shape[0], -1)
    den = float(((w2 @ gram) * w2).sum())
    return float(((d @ gram) * d).sum()) / den if den > 0 else 0.0


def run(model: nn.Module, inputs: Any) -> Any:
    """``model`` on one batch: a tensor, a tuple of positional inputs or a mapping of keyword inputs."""
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
