"""``permute_channels``: find and apply, layer space by layer space, the input-channel permutations
that let N:M keep the most of every layer, without changing the model's function."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import torch
from torch import nn

from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.permute.apply import apply_space
from nmsparse.permute.calib_check import input_grams, input_norms, output_error, run as _run
from nmsparse.permute.graph import CONV, Analysis, TraceError
from nmsparse.permute.network import NetworkObjective, _tensors, accept_greedy, weight_score
from nmsparse.permute.report import PermuteLayer, PermuteReport, SpaceResult
from nmsparse.permute.search import SEARCHES, kept, search_permutation
from nmsparse.permute.tracing import analyse
from nmsparse.surgery.selection import KEEP_DENSE, Patterns, plan

SCORES = ("magnitude", "wanda")
ACCEPTS = ("auto", "score", "error", "network")


def permute_channels(
    model: nn.Module,
    n: int | NMPattern,
    m: int | None = None,
    *,
    example_inputs: Any,
    calib: Iterable | None = None,
    method: str = "magnitude",
    layout: str = "channels",
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    search: str = "auto",
    escapes: int = 100,
    seed: int = 0,
    accept: str = "auto",
    tries: int = 1,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> PermuteReport:
    """Reorder input channels of ``model`` in place so that N:M (N kept per M) keeps more, keeping
    the model's function; return a :class:`PermuteReport`. ``n`` may be an
    :class:`~nmsparse.masking.pattern.NMPattern` (``m`` left out).

    The layers that will be sparsified are chosen as by :func:`nmsparse.sparsify` (``layout``,
    ``include``, ``exclude``, ``keep_dense``). Which layers share a permutation comes from the
    ``torch.fx`` graph traced on ``example_inputs`` (a tensor, a tuple of positional inputs, or a
    mapping of keyword inputs such as a tokenizer's output; Hugging Face models are traced with
    ``transformers.utils.fx``); see :mod:`nmsparse.permute.graph`. A model that cannot be traced is
    left untouched and the report says why. For each permutable channel space the search
    (:func:`nmsparse.permute.search_permutation`: ``search``, ``escapes``, ``seed``) maximises the sum
    over its sparse consumers of the kept fraction of ``|w|`` (``method="magnitude"``) or of the Wanda
    score ``|w| * ||x||`` (``method="wanda"``, input norms from ``calib``: an iterable of batches or
    of ``(inputs, targets)``). The kept fraction of no layer space goes down (the identity is a
    candidate). ``accept``: ``"network"`` keeps a space's permutation only if it lowers the whole
    pruned network's relative output error on ``calib`` (every sparse layer masked N:M by its score,
    greedy over the spaces in graph order; :mod:`nmsparse.permute.network`), so that on ``calib`` the
    pruned network is never worse than without permutation; ``"error"`` keeps it only if it lowers
    the summed relative output error of the space's own sparse layers on ``calib``
    (:mod:`nmsparse.permute.calib_check`); ``"score"`` keeps every permutation that raises the
    objective; a space not kept is left as it is (status ``"rejected"``). ``"auto"`` (default):
    ``"network"`` when ``calib`` is given, else ``"score"``. ``tries``: local searches per space with
    different seeds (``seed``, ``seed + 2``, ...): under ``"network"`` each distinct result is a
    candidate of the greedy step; under ``"error"`` the one with the lowest calibration output error
    of the space's layers is kept, under ``"score"`` the highest objective.
    Afterwards the outputs on ``example_inputs`` are compared with the original ones
    (``rtol``, ``atol`` relative to the output's largest magnitude); on a mismatch the model is
    restored and a RuntimeError raised. The model's training mode is kept.
    """
    pattern = check_nm(n, m)
    n, m = pattern
    if method not in SCORES:
        raise ValueError(f"method must be one of {SCORES}, got {method!r}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if isinstance(escapes, bool) or not isinstance(escapes, int) or escapes < 0:
        raise ValueError(f"escapes must be an integer >= 0, got {escapes!r}")
    if example_inputs is None:
        raise ValueError("permute_channels needs example_inputs (one input batch) to trace the model's graph")
    if accept not in ACCEPTS:
        raise ValueError(f"accept must be one of {ACCEPTS}, got {accept!r}")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"tries must be an integer >= 1, got {tries!r}")
    if accept in ("error", "network") and calib is None:
        raise ValueError(f"accept={accept!r} needs calib=, an iterable of input batches (the output error of the "
                         "pruned layers or network is measured on them); accept='score' needs none")
    accept = ("network" if calib is not None else "score") if accept == "auto" else accept
    if calib is not None and not isinstance(calib, (list, tuple)):
        calib = list(calib)  # read more than once
    if method == "wanda" and calib is None:
        raise ValueError("method='wanda' needs calib=, an iterable of input batches (its input norms score "
                         "the weights); method='magnitude' needs none")
    entries = plan(model, pattern, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense)
    settings = dict(method=method, layout=layout, search=search, escapes=escapes, seed=seed, accept=accept,
                    tries=tries)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        try:
            an = analyse(model, example_inputs)
        except TraceError as e:
            why = f"model cannot be traced ({e}); nothing permuted"
            layers = [PermuteLayer(e_.param, e_.kind, e_.shape, e_.sparse, "unpermuted", why) for e_ in entries]
            return PermuteReport(n, m, layers, [], settings, time.perf_counter() - t0, traced=False)
        settings["graph"] = an.tracer
        modules = dict(model.named_modules())
        sparse = {e.name for e in entries if e.sparse}
        grams = (input_grams(model, [modules[k] for k in sorted(sparse)], calib)
                 if method == "wanda" or accept == "error" else {})
        scores = {k: _score(modules[k], layout, input_norms(modules[k], grams[modules[k]])
                            if method == "wanda" else None) for k in sparse}
        def error(names, perm):
            return sum(output_error(modules[c], grams[modules[c]], scores[c], perm, n, m) for c in names)

        error = error if accept == "error" else None
        results, perms, cands = _search_spaces(an, scores, sparse, modules, layout, pattern, search, escapes, seed,
                                               tries, error)
        if accept == "error":
            _check_errors(results, perms, modules, grams, scores, n, m)
        elif accept == "network":
            t1 = time.perf_counter()
            norms = {k: input_norms(modules[k], grams[modules[k]]) if method == "wanda" else None for k in sparse}
            settings["network"] = _check_network(model, calib, results, perms, cands, modules, sparse, norms,
                                                 pattern, layout)
            settings["network"]["time_s"] = time.perf_counter() - t1
        reference = _run(model, example_inputs)
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for sid, perm in perms.items():
            apply_space(model, next(s for s in an.spaces if s.id == sid), perm)
        diff = 0.0
        if perms:
            diff, scale = _max_diff(reference, _run(model, example_inputs))
            if not diff <= atol * max(scale, 1.0) + rtol * scale:
                model.load_state_dict(backup)
                raise RuntimeError(
                    f"channel permutation changed the model's output (max difference {diff:.3g} at output scale "
                    f"{scale:.3g}); the model was restored. The graph analysis missed an op: please report it")
        layers = _layers(entries, an, results, perms, scores, n, m)
        kept_abs = {}
        for e in entries:
            if e.sparse:
                s = scores[e.name]
                sid = an.input_space.get(e.name)
                perm = perms.get(sid) if isinstance(sid, int) else None
                kept_abs[e.param] = (kept(s, None, n, m), kept(s, perm, n, m), float(s.sum()))
        return PermuteReport(n, m, layers, results, settings, time.perf_counter() - t0, True, diff, kept_abs)
    finally:
        model.train(was_training)


def _search_spaces(an: Analysis, scores, sparse, modules, layout, pattern, search, escapes, seed, tries, error):
    """Search every permutable space; returns the per-space results, the best permutation of each
    space that found one other than the identity, and every distinct non-identity permutation the
    space's searches found (best first: the candidates of ``accept="network"``)."""
    m = pattern.m
    results, perms, cands = [], {}, {}
    for sp in an.spaces:
        members = [f"{k}:{name}" for k, name, _ in sp.members]
        res = SpaceResult(sp.id, sp.size, sp.producers, sp.consumers, members, sp.blocked, [])
        results.append(res)
        if sp.blocked:
            continue
        searched = [c for c in sp.consumers if c in sparse]
        blocked = [c for c in searched if layout == "flat" and isinstance(modules[c], CONV)
                   and math.prod(modules[c].kernel_size) % m and math.prod(modules[c].kernel_size) > 1]
        if blocked:
            res.blocked = sp.blocked = (f"layout='flat' with a {modules[blocked[0]].kernel_size} kernel in "
                                        f"{blocked[0]}: its groups of m straddle channels; use layout='channels'")
            continue
        searched = [c for c in searched if not (layout == "flat" and isinstance(modules[c], CONV)
                                                and math.prod(modules[c].kernel_size) > 1)]
        res.searched = searched
        if not searched or sp.size % m:
            continue
        rows = torch.cat([scores[c] / scores[c].sum().clamp_min(1e-300) for c in searched])
        best, spent, found = None, 0.0, []
        for k in range(tries):
            r = search_permutation(rows, pattern, m, search=search, escapes=escapes, seed=seed + 2 * k)
            spent += r.time_s
            key = -r.after if error is None else error(searched, r.perm)
            if best is None or key < best[0]:
                best = (key, r)
            found.append((key, k, r.perm))
            if r.exact:
                break  # the optimum: other seeds find the same
        r = best[1]
        identity = torch.arange(sp.size)
        distinct: list[torch.Tensor] = []
        for _, _, p in sorted(found, key=lambda t: t[:2]):
            if not torch.equal(p, identity) and not any(torch.equal(p, q) for q in distinct):
                distinct.append(p)
        if distinct:
            cands[sp.id] = distinct
        res.before, res.after, res.exact, res.moves, res.time_s = r.before, r.after, r.exact, r.moves, spent
        if not torch.equal(r.perm, torch.arange(sp.size)):
            res.permuted = True
            perms[sp.id] = r.perm
    return results, perms, cands


def _check_network(model, calib, results, perms, cands, modules, sparse, norms, pattern, layout) -> dict:
    """``accept="network"``: replace ``perms`` by the greedy network-level choice among ``cands``
    (:mod:`nmsparse.permute.network`); record each space's network objective before and with its
    best candidate on its result. Returns the objective without and with the chosen permutations."""
    objective = NetworkObjective(model, calib)
    layers = {k: (modules[k], weight_score(modules[k], norms[k])) for k in sorted(sparse)}
    order = {res.id: [c for c in res.searched if c in layers] for res in results if res.id in cands}
    chosen, trace, base, final = accept_greedy(objective, layers, order, cands, pattern, pattern.m, layout)
    perms.clear()
    perms.update(chosen)
    for res in results:
        if res.id in trace:
            res.network_before, res.network_after = trace[res.id]
            res.permuted = res.id in chosen
            res.rejected = not res.permuted
    return {"unpermuted": base, "permuted": final, "evaluations": objective.evaluations}


def _check_errors(results, perms, modules, grams, scores, n, m) -> None:
    """Keep a space's permutation only if it lowers the summed calibration output error of its
    searched layers; record both errors on the space's result."""
    for res in results:
        if not res.permuted:
            continue
        layers = [(modules[c], grams[modules[c]], scores[c]) for c in res.searched if modules[c] in grams]
        res.error_before = sum(output_error(mod, h, s, None, n, m) for mod, h, s in layers)
        res.error_after = sum(output_error(mod, h, s, perms[res.id], n, m) for mod, h, s in layers)
        if not res.error_after < res.error_before:
            res.permuted, res.rejected = False, True
            del perms[res.id]


def _layers(entries, an, results, perms, scores, n, m) -> list[PermuteLayer]:
    by_id = {r.id: r for r in results}
    out = []
    for e in entries:
        sid = an.input_space.get(e.name)
        row = PermuteLayer(e.param, e.kind, e.shape, e.sparse, "unpermuted")
        if e.sparse:
            s = scores[e.name]
            tot = float(s.sum())
            row.kept_before = row.kept_after = kept(s, None, n, m) / tot if tot else None
        if sid is None:
            row.reason = ("not reached by the traced graph" if e.kind in ("Linear", "Conv1d", "Conv2d", "Conv3d")
                          else e.reason or f"{e.kind} is not a Linear or Conv")
        elif isinstance(sid, str):
            row.reason = sid
        else:
            res = by_id[sid]
            row.space = sid
            if res.blocked:
                row.reason = f"its channel space goes through {res.blocked}" if not res.blocked.startswith(
                    ("reaches", "layout", "module", "produced")) else res.blocked
            elif res.rejected:
                row.status, row.search_s, row.exact = "rejected", res.time_s, res.exact
                if res.network_before is not None:
                    row.reason = (f"the permutation did not lower the pruned network's calibration output error "
                                  f"({res.network_before:.4g} -> {res.network_after:.4g}); left as it was")
                else:
                    row.reason = (f"the permutation raised the calibration output error of its space's layers "
                                  f"({res.error_before:.4g} -> {res.error_after:.4g}); left as it was")
            elif sid in perms:
                row.status = "permuted"
                row.search_s, row.exact = res.time_s, res.exact
                if e.sparse and row.kept_before is not None:
                    row.kept_after = kept(scores[e.name], perms[sid], n, m) / float(scores[e.name].sum())
            elif res.searched:
                row.status, row.search_s, row.exact = "identity", res.time_s, res.exact
            else:
                row.reason = "no sparse layer reads this channel space (nothing to gain)"
        out.append(row)
    return out


def _score(module: nn.Module, layout: str, norms: torch.Tensor | None) -> torch.Tensor:
    """Importance matrix (rows, in_channels): |w| (times the input norms for Wanda); for a conv one
    row per (output channel, kernel position)."""
    w = module.weight.detach().to(torch.float64).abs()
    if norms is not None:
        w = w * norms.to(w).view(1, *w.shape[1:])
    if w.dim() > 2:
        w = w.movedim(1, -1).reshape(-1, w.shape[1])
    return w.cpu()


def _max_diff(a: Any, b: Any) -> tuple[float, float]:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return math.inf, 0.0
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)
    scale = max((float(x.double().abs().max()) for x in ta if x.numel()), default=0.0)
    return diff, scale
