"""The one call :func:`nmsparse.prune` makes when asked for ``permute=True``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

from torch import nn

from nmsparse.permute.channels import permute_channels
from nmsparse.permute.report import PermuteReport


def check(permute: object, transposable: bool, calib: Iterable | None) -> bool:
    """Validate ``prune``'s ``permute`` argument before anything is touched."""
    if not isinstance(permute, bool):
        raise ValueError(f"permute must be True or False, got {permute!r}")
    if permute and transposable:
        raise ValueError("permute=True searches permutations for plain N:M masks; it does not combine with "
                         "transposable=True (use one or the other)")
    if permute and calib is None:
        raise ValueError("permute=True needs calib= (its first batch is the example input that traces the "
                         "model's graph), also with method='magnitude'")
    return permute


def permute_for_prune(model: nn.Module, n: int, m: int, *, method: str, calib: Iterable, layout: str,
                      include, exclude, keep_dense, seed: int = 0) -> PermuteReport:
    """Permute ``model``'s channels for pruning by ``method``: Wanda scores for the methods that read
    activations in their masks (wanda, sparsegpt), magnitude for magnitude and AdaPrune (whose mask
    is the magnitude mask). A space's permutation is kept only if it lowers the calibration output
    error of the space's layers (``accept="error"``)."""
    score = "wanda" if method in ("wanda", "sparsegpt") else "magnitude"
    first = next(iter(calib))
    return permute_channels(model, n, m, example_inputs=_inputs(first), calib=calib, accept="error",
                            method=score, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
                            seed=seed)


def _inputs(item: Any) -> Any:
    if isinstance(item, (tuple, list)) and item and not isinstance(item, Mapping):
        return item[0]
    return item
