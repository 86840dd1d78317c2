"""The one call :func:`nmsparse.prune` makes when asked for ``permute=True``."""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

from torch import nn

from nmsparse.permute.channels import permute_channels
from nmsparse.calibration.collect import _inputs
from nmsparse.permute.network import NetworkObjective
from nmsparse.permute.report import PermuteReport
from nmsparse.masking.pattern import NMPattern


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


def permute_for_prune(model: nn.Module, n: int | NMPattern, m: int | None = None, *, method: str, calib: Iterable, layout: str,
                      include, exclude, keep_dense, seed: int = 0) -> PermuteReport:
    """Permute ``model``'s channels for pruning by ``method``: Wanda scores for the methods that read
    activations in their masks (wanda, sparsegpt), magnitude for magnitude and AdaPrune (whose mask
    is the magnitude mask). A space's permutation is kept only if it lowers the pruned network's
    relative output error on ``calib`` (``accept="network"``, greedy over the spaces). ``n`` may be an
    :class:`~nmsparse.masking.pattern.NMPattern` (``m`` left out), passed on as it is."""
    score = "wanda" if method in ("wanda", "sparsegpt") else "magnitude"
    first = next(iter(calib))
    return permute_channels(model, n, m, example_inputs=_inputs(first), calib=calib, accept="network",
                            method=score, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
                            seed=seed)


def prune_permuted(again: Callable[..., Any], model: nn.Module, n: int | NMPattern, m: int | None = None, *,
                   method: str, calib: Iterable, layout: str, include, exclude, keep_dense, seed: int = 0):
    """``prune(model, ..., permute=True)``: permute (:func:`permute_for_prune`), then prune with
    ``again(model)`` (``prune`` with every other argument bound and ``permute=False``). For magnitude
    the network the permutations were chosen on is the pruned network itself. For the other methods
    (whose weights or masks depend on more than the magnitude score) a copy of the unpermuted model
    is pruned too; if its network output error on ``calib`` is lower, the model takes its pruned
    weights and report, and the permutation report says so. Returns ``prune``'s report with
    ``permutation`` set."""
    was_training = model.training
    backup = copy.deepcopy(model).eval() if method != "magnitude" else None
    objective = NetworkObjective(backup, calib) if backup is not None else None
    perm_report = permute_for_prune(model, n, m, method=method, calib=calib, layout=layout, include=include,
                                    exclude=exclude, keep_dense=keep_dense, seed=seed)
    report = again(model)
    if backup is not None and perm_report.permuted:
        plain = again(backup)
        model.eval()
        try:
            e_perm, e_plain = objective.evaluate(model), objective.evaluate(backup)
        finally:
            model.train(was_training)
        keep = e_perm <= e_plain
        perm_report.settings["pruned_check"] = {"method": method, "permuted": e_perm, "unpermuted": e_plain,
                                                "kept": "permuted" if keep else "unpermuted"}
        if not keep:
            model.load_state_dict(backup.state_dict())
            report = plain
            why = (f"the permuted model pruned by {method} had a higher network calibration output error than the "
                   f"unpermuted one pruned the same way ({e_perm:.4g} > {e_plain:.4g}); the unpermuted result was kept")
            for e in perm_report.layers:
                if e.status == "permuted":
                    e.status, e.reason, e.kept_after = "rejected", why, e.kept_before
            for sp in perm_report.spaces:
                if sp.permuted:
                    sp.permuted, sp.rejected = False, True
            perm_report.kept_abs = {k: (v[0], v[0], v[2]) for k, v in perm_report.kept_abs.items()}
    report.permutation = perm_report
    return report


