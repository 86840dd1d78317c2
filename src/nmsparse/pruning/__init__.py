"""Convert a trained model to N:M (N weights kept in every group of M) in one shot.

:func:`prune` prunes a model in place, layer by layer in forward order, with each layer's calibration
inputs taken from the already-pruned model (see :mod:`nmsparse.calibration.collect`). Methods:

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

import copy
import dataclasses
import functools
import time
import warnings
from typing import Iterable

import torch
from torch import nn

from nmsparse.masking.layout import check_layout, target_is_nm
from nmsparse.masking.nm import check_nm
from nmsparse.calibration import collect as calibration
from nmsparse.pruning import options
from nmsparse.calibration import sequential as seq
from nmsparse.pruning.adaprune import adam_solve, exact_solve
from nmsparse.calibration.geometry import LayerGeometry, im2col
from nmsparse.pruning.magnitude import magnitude_score, select, transposable_fn
from nmsparse.pruning.options import (UNSET, AdaPrune, BlockReconstruct, Magnitude, MethodOptions, SparseGPT,
                                    Wanda)
from nmsparse.pruning.reconstruct import refit_block
from nmsparse.pruning.sparsegpt import sparsegpt
from nmsparse.pruning.wanda import wanda_score
from nmsparse.surgery.selection import KEEP_DENSE, Patterns, SparsityReport, plan

METHODS = options.METHODS
NEEDS_CALIB = ("wanda", "sparsegpt", "adaprune")
SOLVERS = options.SOLVERS

__all__ = [
    "AdaPrune",
    "BlockReconstruct",
    "Magnitude",
    "MethodOptions",
    "SparseGPT",
    "Wanda",
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


def prune(
    model: nn.Module,
    n: int,
    m: int,
    *,
    method: str | MethodOptions,
    calib: Iterable | None = None,
    transposable: bool = False,
    layout: str = "channels",
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    solver: str = UNSET,
    damp: float = UNSET,
    keep_zeros: bool = True,
    iterations: int = UNSET,
    batch_size: int = UNSET,
    lr: float = UNSET,
    bias_lr: float = UNSET,
    blocksize: int = UNSET,
    transposable_method: str | None = None,
    seed: int = 0,
    progress: bool | str = False,
    shared: str = "dense",
    permute: bool = False,
    sequential: bool = True,
    reconstruct: str | BlockReconstruct | None = None,
) -> PruneReport:
    """Prune ``model`` in place to N:M (N weights kept in every group of M) and return a report.

    ``method``: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` or ``"adaprune"`` (see module doc) with
    their default options, or an options object: :class:`~nmsparse.pruning.options.Magnitude`,
    ``Wanda()``, ``SparseGPT(damp=, blocksize=)``, ``AdaPrune(solver=, damp=, iterations=,
    batch_size=, lr=, bias_lr=)``. The per-method keywords ``solver``, ``damp``, ``iterations``,
    ``batch_size``, ``lr``, ``bias_lr`` and ``blocksize`` still work with a method name; one the method
    does not take, or one given together with an options object, is a ValueError.
    ``calib``: an iterable of input batches, or of ``(inputs, targets)``; inputs are a tensor or a
    mapping of keyword arguments (a tokenizer's output). Wanda, SparseGPT and AdaPrune need it;
    magnitude uses it, when given, only to report reconstruction errors. ``transposable``: masks
    that are N:M along both the input and the output axis (M x M tiles). Layer selection
    (``layout``, ``include``, ``exclude``, ``keep_dense``) is that of :func:`nmsparse.sparsify`.

    Other options: ``keep_zeros`` (weights that are already zero stay zero: an unstructured-sparse
    model's zeros are never kept over its non-zeros nor revived), ``transposable_method`` (passed to
    ``nmsparse.masking.transposable.transposable_mask``), ``seed`` (Adam's mini-batch order, permutations),
    ``progress`` (over layers: a :mod:`nmsparse.plumbing.progress` mode; ``True`` = ``$NMSPARSE_PROGRESS`` or auto,
    a tqdm bar on a terminal and one closing line otherwise), ``shared`` (a weight several modules hold,
    such as tied embeddings: ``"dense"`` keeps it dense, ``"sparsify"`` prunes it, by its first
    supported user's inputs, for every module that uses it; see :mod:`nmsparse.surgery.selection`).

    ``sequential`` (default True): the layers of a model's repeated blocks (an ``nn.ModuleList`` of
    identical blocks) are calibrated block by block from each block's cached inputs (see
    :mod:`nmsparse.calibration.sequential`): one pass through the model instead of one per layer, the same
    pruned weights. Models without such blocks, or whose blocks cannot be replayed one by one, take
    whole-model passes (``report.settings["sequential"]`` says which and why).
    ``reconstruct``: ``None``/``"layer"`` (each layer on its own, the default) or ``"block"`` /
    :class:`~nmsparse.pruning.options.BlockReconstruct`: after each block's masks are chosen, its
    parameters are refit jointly to the dense block's output (:mod:`nmsparse.pruning.reconstruct`);
    needs ``calib`` and repeated blocks.

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
    opt_obj = options.resolve(method, dict(solver=solver, damp=damp, iterations=iterations, batch_size=batch_size,
                                           lr=lr, bias_lr=bias_lr, blocksize=blocksize))
    method = opt_obj.name
    recon = options.resolve_reconstruct(reconstruct)
    check_layout(layout)
    if not isinstance(transposable, bool):
        raise ValueError(f"transposable must be True or False, got {transposable!r}")
    if not isinstance(sequential, bool):
        raise ValueError(f"sequential must be True or False, got {sequential!r}")
    if recon is not None and not sequential:
        raise ValueError("reconstruct='block' works block by block: it needs sequential=True")
    if transposable:
        transposable_fn()  # fail now, before touching the model, if it is unavailable
    entries = plan(model, n, m, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
                   shared=shared, transposable=transposable)
    modules = dict(model.named_modules())
    calib = calibration.prepare(calib)
    if (opt_obj.needs_calib or recon is not None) and calib is None:
        what = f"method={method!r}" if recon is None else "reconstruct='block'"
        raise ValueError(
            f"{what} needs calibration data: pass calib=, an iterable of input batches or of "
            "(inputs, targets) pairs (e.g. a DataLoader over ~100 training samples); "
            "method='magnitude' needs none"
        )
    from nmsparse.permute import prune_hook

    if prune_hook.check(permute, transposable, calib):
        again = functools.partial(
            prune, n=n, m=m, method=opt_obj, calib=calib, layout=layout, include=include, exclude=exclude,
            keep_dense=keep_dense, keep_zeros=keep_zeros, transposable_method=transposable_method, seed=seed,
            progress=progress, shared=shared, sequential=sequential, reconstruct=recon)
        return prune_hook.prune_permuted(again, model, n, m, method=method, calib=calib, layout=layout,
                                         include=include, exclude=exclude, keep_dense=keep_dense, seed=seed)
    sparse = {e.name: e for e in entries if e.sparse}
    if not sparse:
        warnings.warn("prune made no layer sparse:\n" + SparsityReport(n, m, entries).table(), stacklevel=2)
    settings = dict(method=method, layout=layout, transposable=transposable, keep_zeros=keep_zeros)
    if shared != "dense":
        settings["shared"] = shared
    settings.update(opt_obj.settings())
    if recon is not None:
        settings["reconstruct"] = {"kind": "block", **dataclasses.asdict(recon), "blocks": {}}

    opts = dict(method=method, solver=getattr(opt_obj, "solver", None), damp=getattr(opt_obj, "damp", None),
                keep_zeros=keep_zeros, iterations=getattr(opt_obj, "iterations", None),
                lr=getattr(opt_obj, "lr", None), bias_lr=getattr(opt_obj, "bias_lr", None),
                blocksize=getattr(opt_obj, "blocksize", None), transposable=transposable,
                transposable_method=transposable_method, seed=seed)
    bin_size = opt_obj.batch_size if (method == "adaprune" and opt_obj.solver == "adam") else None
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    results: dict[str, LayerResult] = {}
    try:
        if calib is not None and sparse:
            groups = calibration.forward_order(model, {k: modules[k] for k in sparse}, calib)
            reached = {k for g in groups for k in g}
        else:
            reached, groups = set(), []
        unreached = [[k] for k in sparse if k not in reached]
        if sequential and groups:
            runs, why = seq.plan(model, groups)
        else:
            runs, why = [seq.Run(None, [groups])], {}
        if recon is not None:
            _check_replayable(model, runs, why, calib)
        bar = _progress(len(sparse), progress, f"prune {n}:{m} {method}")
        state = _State(model, modules, sparse, layout, bin_size, calib, n, m, opts, results, bar)
        used: dict[str, int] = {}
        for run in runs:
            if run.path is None:
                for group in run.groups[0]:
                    state.whole_model(group)
                continue
            try:
                items, recipe = seq.capture(model, run, calib)
            except seq.FlowError as e:
                why[run.path] = str(e)
                for block_groups in run.groups:
                    for group in block_groups:
                        state.whole_model(group)
                continue
            used[run.path] = used.get(run.path, 0) + len(run.groups)
            _run_blocks(state, run, items, recipe, recon, settings, seed)
        for group in unreached:
            state.whole_model(group, reached=False)
        bar.close()
    finally:
        model.train(was_training)
    if calib is not None and sparse:
        settings["sequential"] = {"blocks": used, "whole_model": why} if sequential else False
    report = PruneReport(n, m, entries, settings, results, time.perf_counter() - t_start)
    report.permutation = None
    return report


def _check_replayable(model, runs, why, calib) -> None:
    """reconstruct='block' needs block runs that replay: checked on the first calibration batch
    before anything is pruned, so that a model it cannot handle is refused untouched."""
    block_runs = [r for r in runs if r.path is not None]
    first = [next(iter(calib))]
    for r in block_runs:
        try:
            seq.capture(model, r, first)
        except seq.FlowError as e:
            why[r.path] = str(e)
    ok = [r for r in block_runs if r.path not in why]
    if not ok:
        reasons = "; ".join(f"{k}: {v}" for k, v in why.items()) or seq.NO_BLOCKS
        raise ValueError(f"reconstruct='block' needs repeated blocks that can be run one by one ({reasons}); "
                         "use reconstruct=None")


class _State:
    """What the pruning loop shares: the model, its layers, the options and the results so far."""

    def __init__(self, model, modules, sparse, layout, bin_size, calib, n, m, opts, results, bar) -> None:
        self.model, self.modules, self.sparse, self.layout = model, modules, sparse, layout
        self.bin_size, self.calib, self.n, self.m, self.opts = bin_size, calib, n, m, opts
        self.results, self.bar = results, bar

    def whole_model(self, group: list[str], reached: bool = True) -> None:
        """Calibrate ``group`` by whole-model passes (one per batch), then prune it."""
        t0 = time.perf_counter()
        collectors = None
        if self.calib is not None and reached:
            collectors = _collect_group(self.model, {k: (self.modules[k], self.sparse[k].tensor_name) for k in group},
                                        self.layout, self.bin_size, self.calib)
        self.prune_group(group, collectors, (time.perf_counter() - t0) / len(group))

    def prune_group(self, group: list[str], collectors: dict | None, t_calib: float) -> None:
        for k in group:
            t1 = time.perf_counter()
            grams = collectors[k].grams if collectors else None
            note = ""
            if grams is None and self.opts["method"] in NEEDS_CALIB:
                note = "not reached by the calibration forward pass: pruned by magnitude"
                warnings.warn(f"layer {k}: {note}", stacklevel=3)
            res = _prune_layer(self.modules[k], self.sparse[k].tensor_name, self.n, self.m, self.layout, grams,
                               self.opts)
            res.param, res.note = self.sparse[k].param, note
            res.time_s = t_calib + time.perf_counter() - t1
            self.results[self.sparse[k].param] = res
            self.bar.update(1)


def _run_blocks(state: _State, run, items: list[dict], recipe, recon, settings: dict, seed: int) -> None:
    """Prune a run's blocks one by one from their cached inputs ``items`` (see
    :mod:`nmsparse.calibration.sequential`), refitting each block when ``recon`` is given."""
    firsts = items
    teacher = items if recon is not None and recon.target == "teacher" else None
    for i, block_groups in enumerate(run.groups):
        j = run.first + i
        block = run.blocks[j]
        prefix = f"{run.path}.{j}."
        runner = seq.BlockRunner(block)
        dense = copy.deepcopy(block) if recon is not None else None
        for group in block_groups:
            t0 = time.perf_counter()
            local = {"block." + k[len(prefix):]: (state.modules[k], state.sparse[k].tensor_name) for k in group}
            collectors = _collect_group(runner, local, state.layout, state.bin_size, items)
            collectors = {prefix + r[len("block."):]: c for r, c in collectors.items()}
            state.prune_group(group, collectors, (time.perf_counter() - t0) / len(group))
        if recon is not None and block_groups:
            targets = seq.outputs(dense, teacher if teacher is not None else items)
            masks = {k[len(prefix):] + "." + state.sparse[k].tensor_name:
                     getattr(state.modules[k], state.sparse[k].tensor_name).detach() != 0
                     for g in block_groups for k in g}
            info = refit_block(block, items, targets, masks, recon, seed=seed + j)
            settings["reconstruct"]["blocks"][f"{run.path}.{j}"] = info
        if i + 1 < len(run.groups):
            if teacher is not None:
                teacher = seq.advance(dense, teacher, firsts, recipe)
            items = seq.advance(block, items, firsts, recipe)


def _collect_group(model, layers: dict, layout, bin_size, calib) -> dict:
    """Collectors of ``layers`` (name in ``model`` -> (module, tensor name)) after one calibration pass
    per batch; layers reading the very same input share one (one Gram matrix), unless the data flow
    changes between batches (then none share)."""
    device = calibration._device(model)

    def fresh():
        return {k: calibration.LayerCollector(LayerGeometry(mod, layout, t), device, bin_size)
                for k, (mod, t) in layers.items()}

    collectors = fresh()
    try:
        calibration.collect(model, collectors, calib, share=len(layers) > 1)
    except calibration.ShareMismatch:
        collectors = fresh()
        calibration.collect(model, collectors, calib)
    return collectors


def _progress(total: int, mode: bool | str, desc: str):
    from nmsparse.plumbing.progress import Progress

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
            Hq = H.float()  # the report's errors: float32 is precise enough and several times faster
            den += _quad(W_aug.float(), Hq)
            nb = _quad((W_aug - masked).float(), Hq)
            num_before += nb
            num_after += nb if method in ("magnitude", "wanda") else _quad((W_aug - final).float(), Hq)
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
