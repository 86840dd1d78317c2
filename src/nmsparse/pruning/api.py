"""The public entry of one-shot pruning: :func:`prune` checks its arguments, plans the layers, and runs
the loop of :mod:`nmsparse.pruning.loop`."""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Iterable

from torch import nn

from nmsparse.calibration import collect as calibration
from nmsparse.calibration import sequential as seq
from nmsparse.masking.layout import check_layout
from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.pruning import options
from nmsparse.pruning.loop import State, check_replayable, run_blocks
from nmsparse.pruning.magnitude import transposable_fn
from nmsparse.pruning.options import UNSET, BlockReconstruct, MethodOptions
from nmsparse.pruning.report import LayerResult, PruneReport
from nmsparse.surgery.selection import KEEP_DENSE, Patterns, SparsityReport, plan


def prune(
    model: nn.Module,
    n: int | NMPattern,
    m: int | None = None,
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
    sequential: bool | str = True,
    reconstruct: str | BlockReconstruct | None = None,
) -> PruneReport:
    """Prune ``model`` in place to N:M (N weights kept in every group of M) and return a report.

    ``n``, ``m``: integers, or an :class:`~nmsparse.masking.pattern.NMPattern` as ``n`` (``m`` left out).

    ``method``: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` or ``"adaprune"`` (see module doc) with
    their default options, or an options object: :class:`~nmsparse.pruning.options.Magnitude`,
    ``Wanda()``, ``SparseGPT(damp=, blocksize=, precision=)``, ``AdaPrune(solver=, damp=, iterations=,
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
    pruned weights. Each layer group of a block is calibrated by a run of the block from its cached
    inputs with the block's earlier groups already pruned, as whole-model passes would. ``"block"``: one
    calibration run per block instead (llm-compressor's sequential pipeline): all layers of a block
    are calibrated at once from the block's cached inputs (later layers see the *unpruned* earlier
    ones), then pruned, then the pruned block is run once to give the next block its inputs; faster
    (BERT: 2 block runs per block instead of 5), slightly different weights. ``False``: whole-model
    passes, one per layer group. Models without such blocks, or whose blocks cannot be replayed one by
    one, take whole-model passes (``report.settings["sequential"]`` says which and why; with
    ``"block"`` it also holds ``"mode": "block"``).
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
    pattern = check_nm(n, m)
    n, m = pattern
    opt_obj = options.resolve(method, dict(solver=solver, damp=damp, iterations=iterations, batch_size=batch_size,
                                           lr=lr, bias_lr=bias_lr, blocksize=blocksize))
    method = opt_obj.name
    recon = options.resolve_reconstruct(reconstruct)
    check_layout(layout)
    if not isinstance(transposable, bool):
        raise ValueError(f"transposable must be True or False, got {transposable!r}")
    if not (isinstance(sequential, bool) or sequential == "block"):
        raise ValueError(f"sequential must be True, False or 'block', got {sequential!r}")
    if recon is not None and sequential is False:
        raise ValueError("reconstruct='block' works block by block: it needs sequential=True or 'block'")
    if transposable:
        transposable_fn()  # fail now, before touching the model, if it is unavailable
    entries = plan(model, pattern, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
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
            prune, n=pattern, method=opt_obj, calib=calib, layout=layout, include=include, exclude=exclude,
            keep_dense=keep_dense, keep_zeros=keep_zeros, transposable_method=transposable_method, seed=seed,
            progress=progress, shared=shared, sequential=sequential, reconstruct=recon)
        return prune_hook.prune_permuted(again, model, pattern, method=method, calib=calib, layout=layout,
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
                blocksize=getattr(opt_obj, "blocksize", None), precision=getattr(opt_obj, "precision", None),
                transposable=transposable,
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
            check_replayable(model, runs, why, calib)
        bar = _progress(len(sparse), progress, f"prune {n}:{m} {method}")
        state = State(model, modules, sparse, layout, bin_size, calib, pattern, opts, results, bar)
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
            run_blocks(state, run, items, recipe, recon, settings, seed, one_pass=sequential == "block")
        for group in unreached:
            state.whole_model(group, reached=False)
        bar.close()
    finally:
        model.train(was_training)
    if calib is not None and sparse:
        settings["sequential"] = {"blocks": used, "whole_model": why} if sequential else False
        if sequential == "block":
            settings["sequential"] = {"mode": "block", **settings["sequential"]}
    report = PruneReport(n, m, entries, settings, results, time.perf_counter() - t_start)
    report.permutation = None
    return report
def _progress(total: int, mode: bool | str, desc: str):
    from nmsparse.plumbing.progress import Progress

    return Progress(total, desc, mode=mode, unit="layer", leave=True)

