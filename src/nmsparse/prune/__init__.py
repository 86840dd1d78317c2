"""Convert a trained model to N:M (N weights kept in every group of M) in one shot.

:func:`prune` prunes a model in place, layer by layer in forward order, with each layer's calibration
inputs taken from the already-pruned model (see :mod:`nmsparse.prune.calibration`). Methods:

* ``"magnitude"``: keep the N largest ``|w|`` of every group (NVIDIA ASP's one-shot step).
* ``"wanda"``: keep the N largest ``|w| * ||x||`` (Sun et al., 2023); no weight update.
* ``"sparsegpt"``: OBS-based pruning with weight update (Frantar and Alistarh, 2023).
* ``"adaprune"``: magnitude mask, then refit the kept weights and bias to the dense layer's outputs
  (Hubara et al., 2021), by ``solver="exact"`` (ridge least squares per row) or ``solver="adam"``
  (the paper's Adam).

Fine-tune recipe afterwards: ``nmsparse.sparsify(model, n, m, method="fixed")`` freezes the pruned
model's masks (every surviving weight is kept) and training updates only the kept weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Iterable

import torch
from torch import nn

from nmsparse.layout import check_layout, target_is_nm
from nmsparse.nmmasks import check_nm
from nmsparse.prune import calibration
from nmsparse.prune.adaprune import adam_solve, exact_solve
from nmsparse.prune.geometry import LayerGeometry, im2col
from nmsparse.prune.magnitude import magnitude_score, select, transposable_fn
from nmsparse.prune.sparsegpt import sparsegpt
from nmsparse.prune.wanda import wanda_score
from nmsparse.selection import KEEP_DENSE, Patterns, SparsityReport, plan

METHODS = ("magnitude", "wanda", "sparsegpt", "adaprune")
NEEDS_CALIB = ("wanda", "sparsegpt", "adaprune")
SOLVERS = ("exact", "adam")

__all__ = [
    "METHODS",
    "SOLVERS",
    "LayerResult",
    "PruneReport",
    "adam_solve",
    "exact_solve",
    "im2col",
    "prune",
    "recalibrate_batchnorm",
]


@dataclasses.dataclass
class LayerResult:
    """What pruning did to one layer.

    ``kept_abs``: fraction of the layer's original ``sum |w|`` at kept positions. ``error_before`` /
    ``error_after``: relative reconstruction error on the calibration inputs,
    ``||(W - W') X + (b - b')||^2 / ||W X + b||^2``, with ``W'`` the mask applied to the original
    weights (before any update) and the final weights (after); None without calibration data.
    ``rows``: calibration rows (tokens, positions) seen. ``time_s``: seconds for this layer, the
    calibration pass included. ``note``: anything unusual.
    """

    param: str
    kept_abs: float
    error_before: float | None
    error_after: float | None
    time_s: float
    rows: int = 0
    note: str = ""


class PruneReport(SparsityReport):
    """A :class:`~nmsparse.SparsityReport` with one :class:`LayerResult` per pruned layer."""

    def __init__(self, n: int, m: int, layers, settings: dict, results: dict[str, LayerResult], time_s: float):
        super().__init__(n, m, layers, settings)
        self.results = results
        self.time_s = time_s

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["results"] = {k: dataclasses.asdict(v) for k, v in self.results.items()}
        d["time_s"] = self.time_s
        if getattr(self, "permutation", None) is not None:
            d["permutation"] = self.permutation.to_dict()
        return d

    def mean(self, field: str) -> float | None:
        vals = [getattr(r, field) for r in self.results.values() if getattr(r, field) is not None]
        return sum(vals) / len(vals) if vals else None

    def table(self) -> str:
        def f(v):
            return "-" if v is None else f"{v:.4f}"

        rows = [("layer", "shape", "kept |w|", "err before", "err after", "time")]
        for e in self.layers:
            r = self.results.get(e.param)
            if r is None:
                rows.append((e.param, "x".join(map(str, e.shape)), f"dense: {e.reason}", "", "", ""))
            else:
                rows.append((e.param, "x".join(map(str, e.shape)), f"{r.kept_abs:.4f}", f(r.error_before),
                             f(r.error_after), f"{r.time_s:.2f}s"))
        widths = [max(len(r[i]) for r in rows if not (r[2].startswith("dense") and i == 2)) for i in range(6)]
        lines = []
        for r in rows:
            if r[2].startswith("dense"):
                lines.append(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}")
            else:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        s = self.settings
        extra = f", solver={s['solver']}" if s.get("method") == "adaprune" else ""
        t = ", transposable" if s.get("transposable") else ""
        lines.append(
            f"{self.n}:{self.m} {s.get('method')}{extra}{t}: {len(self.sparse)} layers pruned, "
            f"{len(self.dense)} dense; mean error before {f(self.mean('error_before'))}, "
            f"after {f(self.mean('error_after'))}; {self.time_s:.1f}s"
        )
        return "\n".join(lines)


def _check_choice(what: str, value: object, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_positive(what: str, value: object, integer: bool = False, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
    if ok:
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)  # type: ignore[arg-type]
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{what} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def prune(
    model: nn.Module,
    n: int,
    m: int,
    *,
    method: str,
    calib: Iterable | None = None,
    transposable: bool = False,
    layout: str = "channels",
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    solver: str = "exact",
    damp: float = 0.01,
    keep_zeros: bool = True,
    iterations: int = 1000,
    batch_size: int = 50,
    lr: float = 1e-3,
    bias_lr: float = 1e-2,
    blocksize: int = 128,
    transposable_method: str | None = None,
    seed: int = 0,
    progress: bool | str = False,
    shared: str = "dense",
    permute: bool = False,
) -> PruneReport:
    """Prune ``model`` in place to N:M (N weights kept in every group of M) and return a report.

    ``method``: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` or ``"adaprune"`` (see module doc).
    ``calib``: an iterable of input batches, or of ``(inputs, targets)``; inputs are a tensor or a
    mapping of keyword arguments (a tokenizer's output). Wanda, SparseGPT and AdaPrune need it;
    magnitude uses it, when given, only to report reconstruction errors. ``transposable``: masks
    that are N:M along both the input and the output axis (M x M tiles). Layer selection
    (``layout``, ``include``, ``exclude``, ``keep_dense``) is that of :func:`nmsparse.sparsify`.

    Options: ``solver`` (AdaPrune: ``"exact"`` or ``"adam"``), ``damp`` (ridge / Hessian dampening,
    relative to the mean of diag(X^T X); SparseGPT and the exact solver), ``iterations``,
    ``batch_size`` (calibration samples per Adam step), ``lr`` / ``bias_lr`` (Adam), ``blocksize``
    (SparseGPT), ``keep_zeros`` (weights that are already zero stay zero: an unstructured-sparse
    model's zeros are never kept over its non-zeros nor revived), ``transposable_method`` (passed to
    ``nmsparse.transposable.transposable_mask``), ``seed`` (Adam's mini-batch order), ``progress``
    (over layers: a :mod:`nmsparse.progress` mode; ``True`` = ``$NMSPARSE_PROGRESS`` or auto, a tqdm bar on
    a terminal and one closing line otherwise), ``shared`` (a weight several modules hold, such as tied embeddings:
    ``"dense"`` keeps it dense, ``"sparsify"`` prunes it, by its first supported user's inputs, for
    every module that uses it; see :mod:`nmsparse.selection`).

    Supported tensors: ``weight`` of Linear, Conv1d/2d/3d and ``transformers``' ``Conv1D``, and
    ``nn.MultiheadAttention.in_proj_weight`` (its query/key/value projections are calibrated on the
    layer's query/key/value inputs). ``permute``: first reorder channels with
    :func:`nmsparse.permute_channels` (function-preserving) so the masks keep more; needs ``calib``.
    A space's permutation is kept only where it lowers the whole pruned network's relative output
    error on ``calib`` (``accept="network"``); for methods other than magnitude the unpermuted model
    is pruned too and the permuted result kept only if its network output error on ``calib`` is not
    higher: on the calibration data ``permute=True`` is never worse than ``permute=False`` (see
    docs/permute.md).

    The model is left in the training mode it had, with plain weights holding zeros where pruned.
    """
    n, m = check_nm(n, m)
    _check_choice("method", method, METHODS)
    _check_choice("solver", solver, SOLVERS)
    check_layout(layout)
    _check_positive("damp", damp, allow_zero=True)
    _check_positive("iterations", iterations, integer=True, allow_zero=True)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("lr", lr)
    _check_positive("bias_lr", bias_lr)
    _check_positive("blocksize", blocksize, integer=True)
    if not isinstance(transposable, bool):
        raise ValueError(f"transposable must be True or False, got {transposable!r}")
    if transposable:
        transposable_fn()  # fail now, before touching the model, if it is unavailable
    entries = plan(model, n, m, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
                   shared=shared, transposable=transposable)
    modules = dict(model.named_modules())
    calib = calibration.prepare(calib)
    if method in NEEDS_CALIB and calib is None:
        raise ValueError(
            f"method={method!r} needs calibration data: pass calib=, an iterable of input batches or of "
            "(inputs, targets) pairs (e.g. a DataLoader over ~100 training samples); "
            "method='magnitude' needs none"
        )
    from nmsparse.permute import prune_hook

    if prune_hook.check(permute, transposable, calib):
        again = functools.partial(
            prune, n=n, m=m, method=method, calib=calib, layout=layout, include=include, exclude=exclude,
            keep_dense=keep_dense, solver=solver, damp=damp, keep_zeros=keep_zeros, iterations=iterations,
            batch_size=batch_size, lr=lr, bias_lr=bias_lr, blocksize=blocksize,
            transposable_method=transposable_method, seed=seed, progress=progress, shared=shared)
        return prune_hook.prune_permuted(again, model, n, m, method=method, calib=calib, layout=layout,
                                         include=include, exclude=exclude, keep_dense=keep_dense, seed=seed)
    sparse = {e.name: e for e in entries if e.sparse}
    if not sparse:
        warnings.warn("prune made no layer sparse:\n" + SparsityReport(n, m, entries).table(), stacklevel=2)
    settings = dict(method=method, layout=layout, transposable=transposable, keep_zeros=keep_zeros)
    if shared != "dense":
        settings["shared"] = shared
    if method == "adaprune":
        settings["solver"] = solver
        if solver == "adam":
            settings.update(iterations=iterations, batch_size=batch_size, lr=lr, bias_lr=bias_lr)
    if method in ("sparsegpt",) or (method == "adaprune" and solver == "exact"):
        settings["damp"] = damp
    if method == "sparsegpt":
        settings["blocksize"] = blocksize

    opts = dict(method=method, solver=solver, damp=damp, keep_zeros=keep_zeros, iterations=iterations,
                lr=lr, bias_lr=bias_lr, blocksize=blocksize, transposable=transposable,
                transposable_method=transposable_method, seed=seed)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    results: dict[str, LayerResult] = {}
    try:
        if calib is not None and sparse:
            groups = calibration.forward_order(model, {k: modules[k] for k in sparse}, calib)
            reached = {k for g in groups for k in g}
            groups += [[k] for k in sparse if k not in reached]
        else:
            reached = set()
            groups = [[k] for k in sparse]
        bar = _progress(len(sparse), progress, f"prune {n}:{m} {method}")
        bin_size = batch_size if (method == "adaprune" and solver == "adam") else None
        for group in groups:
            t0 = time.perf_counter()
            collectors = None
            if calib is not None and group[0] in reached:
                collectors = _collect_group(model, group, modules, sparse, layout, bin_size, calib)
            t_calib = (time.perf_counter() - t0) / len(group)
            for k in group:
                t1 = time.perf_counter()
                grams = collectors[k].grams if collectors else None
                note = ""
                if grams is None and method in NEEDS_CALIB:
                    note = "not reached by the calibration forward pass: pruned by magnitude"
                    warnings.warn(f"layer {k}: {note}", stacklevel=2)
                res = _prune_layer(modules[k], sparse[k].tensor_name, n, m, layout, grams, opts)
                res.param, res.note = sparse[k].param, note
                res.time_s = t_calib + time.perf_counter() - t1
                results[sparse[k].param] = res
                bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    report = PruneReport(n, m, entries, settings, results, time.perf_counter() - t_start)
    report.permutation = None
    return report


def _collect_group(model, group, modules, sparse, layout, bin_size, calib) -> dict:
    """The group's collectors after one calibration pass per batch; layers reading the very same input
    share one (one Gram matrix), unless the data flow changes between batches (then none share)."""
    device = calibration._device(model)

    def fresh():
        return {k: calibration.LayerCollector(LayerGeometry(modules[k], layout, sparse[k].tensor_name),
                                              device, bin_size) for k in group}

    collectors = fresh()
    try:
        calibration.collect(model, collectors, calib, share=len(group) > 1)
    except calibration.ShareMismatch:
        collectors = fresh()
        calibration.collect(model, collectors, calib)
    return collectors


def _progress(total: int, mode: bool | str, desc: str):
    from nmsparse.progress import Progress

    return Progress(total, desc, mode=mode, unit="layer", leave=True)


def _quad(delta: torch.Tensor, H: torch.Tensor) -> float:
    return float(((delta @ H) * delta).sum())


@torch.no_grad()
def _prune_layer(module: nn.Module, name: str, n: int, m: int, layout: str, grams, opts: dict) -> LayerResult:
    geom = LayerGeometry(module, layout, name)
    method = opts["method"] if grams is not None or opts["method"] == "magnitude" else "magnitude"
    sel = lambda s: select(s, n, m, transposable=opts["transposable"],  # noqa: E731
                           transposable_method=opts["transposable_method"])
    new_w, new_b = [], []
    kept_num = kept_den = 0.0
    num_before = num_after = den = 0.0
    rows = 0
    for g, (w, b) in enumerate(zip(geom.weight2d(), geom.bias2d())):
        W = w.to(torch.float64)
        B = None if b is None else b.to(torch.float64)
        H = grams[g].H if grams is not None else None
        if H is not None:
            W, B = W.to(H.device), (None if B is None else B.to(H.device))
            rows = max(rows, grams[g].rows)
        zeros = (W == 0) if opts["keep_zeros"] else None
        d = W.shape[1]
        if method == "magnitude":
            keep = sel(magnitude_score(W))
        elif method == "wanda":
            keep = sel(wanda_score(W, H))
        elif method == "sparsegpt":
            Wn, keep = sparsegpt(W, H[:d, :d], n, m, sel, forced=zeros, damp=opts["damp"],
                                 blocksize=opts["blocksize"])
        else:  # adaprune
            keep = sel(magnitude_score(W))
        if zeros is not None:
            keep = keep & ~zeros
        W_aug = W if B is None else torch.cat([W, B.unsqueeze(1)], 1)
        keep_aug = keep if B is None else torch.cat([keep, keep.new_ones(keep.shape[0], 1)], 1)
        masked = W_aug * keep_aug
        if method in ("magnitude", "wanda"):
            final = masked
        elif method == "sparsegpt":
            final = Wn if B is None else torch.cat([Wn * keep, B.unsqueeze(1)], 1)
        elif opts["solver"] == "exact":
            final = exact_solve(W_aug, H, keep_aug, damp=opts["damp"])
        else:
            final = adam_solve(W_aug, keep_aug, grams[g].bins, bias=B is not None, iterations=opts["iterations"],
                               lr=opts["lr"], bias_lr=opts["bias_lr"], seed=opts["seed"]).to(torch.float64)
        final = final * keep_aug
        if not torch.isfinite(final).all():
            raise FloatingPointError(f"pruning produced non-finite weights in a {type(module).__name__} layer")
        absw = W.abs()
        kept_num += float((absw * keep).sum())
        kept_den += float(absw.sum())
        if H is not None:
            den += _quad(W_aug, H)
            num_before += _quad(W_aug - masked, H)
            num_after += _quad(W_aug - final, H)
        new_w.append(final[:, :d])
        new_b.append(None if B is None else final[:, d])
    weight = geom.assemble(new_w)
    param = getattr(module, name)
    param.copy_(weight.to(device=param.device, dtype=param.dtype))
    if geom.has_bias:
        bias = getattr(module, geom.bias_name)
        bias.copy_(torch.cat(new_b).to(device=bias.device, dtype=bias.dtype))
    if not target_is_nm(param, module, name, n, m, layout):  # pragma: no cover - a bug if it happens
        raise AssertionError(f"internal error: pruned {type(module).__name__} weight is not {n}:{m}")
    has_h = grams is not None
    return LayerResult(
        param="",
        kept_abs=kept_num / kept_den if kept_den else 1.0,
        error_before=(num_before / den if den else 0.0) if has_h else None,
        error_after=(num_after / den if den else 0.0) if has_h else None,
        time_s=0.0,
        rows=rows,
    )


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calib: Iterable) -> int:
    """Re-estimate the running mean and variance of every batch-norm layer of ``model`` from the
    calibration batches (a cumulative average over them), as the AdaPrune authors do after pruning.
    Other layers run in eval mode; the model's training mode is restored. Returns the number of
    batch-norm layers updated (0 when there are none; ``calib`` is then not used)."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
           and mod.track_running_stats]
    if not bns:
        return 0
    calib = calibration.prepare(calib)
    if calib is None:
        raise ValueError("recalibrate_batchnorm needs calibration data (an iterable of input batches)")
    was_training = model.training
    saved = [(mod, mod.momentum, mod.training) for mod in bns]
    model.eval()
    device = calibration._device(model)
    try:
        for mod in bns:
            mod.reset_running_stats()
            mod.momentum = None  # cumulative moving average over the calibration batches
            mod.train()
        for item in calib:
            calibration._call(model, calibration._to(calibration._inputs(item), device))
    finally:
        for mod, momentum, training in saved:
            mod.momentum = momentum
            mod.train(training)
        model.train(was_training)
    return len(bns)
