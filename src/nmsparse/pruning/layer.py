"""Pruning one layer to N:M from its calibration statistics: the per-method dispatch of :func:`nmsparse.prune`."""

from __future__ import annotations

import torch
from torch import nn

from nmsparse.calibration.geometry import LayerGeometry
from nmsparse.masking.layout import target_is_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.pruning.adaprune import adam_solve, exact_solve
from nmsparse.pruning.magnitude import magnitude_score, select
from nmsparse.pruning.report import LayerResult
from nmsparse.pruning.sparsegpt import sparsegpt
from nmsparse.pruning.wanda import wanda_score


def _errors(W_aug: torch.Tensor, masked: torch.Tensor, final: torch.Tensor, gram, update: bool) -> tuple:
    """The report's ``(den, before, after)``: ``||W X^T||^2``, ``||(W - masked) X^T||^2`` and
    ``||(W - final) X^T||^2`` (``after = before`` without a weight ``update``) over the calibration rows
    (from ``H = X^T X``), or, for a Gram without ``H`` (``full=False``), over its sample of rows."""
    if gram.H is None:
        X = gram.sample
        if X.shape[0] == 0:
            return 0.0, 0.0, 0.0
        Wf = W_aug.float().to(X.device)
        parts = [Wf, Wf - masked.float().to(X.device)] + ([Wf - final.float().to(X.device)] if update else [])
        sq = (X @ torch.cat(parts).T).square().reshape(X.shape[0], len(parts), -1).sum((0, 2))
        den, before = float(sq[0]), float(sq[1])
        return den, before, float(sq[2]) if update else before
    Hq = gram.H.float()  # float32 is precise enough and several times faster
    parts = [W_aug, W_aug - masked] + ([W_aug - final] if update else [])
    D = torch.cat(parts).float()
    sq = ((D @ Hq) * D).reshape(len(parts), -1).sum(1)  # one product for all three
    den, before = float(sq[0]), float(sq[1])
    return den, before, float(sq[2]) if update else before


@torch.no_grad()
def prune_layer(module: nn.Module, name: str, pattern: NMPattern, layout: str, grams, opts: dict) -> LayerResult:
    """Prune ``module``'s tensor ``name`` in place to N:M (``pattern``, already checked) by
    ``opts["method"]`` from its calibration Gram matrices ``grams`` (one per weight group; None without
    calibration: then by magnitude), refitting the bias where the method does. Wanda and magnitude
    take Grams without ``H`` (``full=False``: feature norms and a sample of rows for the report's errors,
    see :class:`nmsparse.calibration.gram.Gram`); SparseGPT and AdaPrune need ``H``. Returns the layer's
    :class:`LayerResult` with ``param`` and ``time_s`` left for the caller to fill in."""
    n, m = pattern
    geom = LayerGeometry(module, layout, name)
    method = opts["method"] if grams is not None or opts["method"] == "magnitude" else "magnitude"
    sel = lambda s: select(s, pattern, transposable=opts["transposable"],  # noqa: E731
                           transposable_method=opts["transposable_method"])
    new_w, new_b = [], []
    kept_num = kept_den = 0.0
    num_before = num_after = den = 0.0
    rows = 0
    for g, (w, b) in enumerate(zip(geom.weight2d(), geom.bias2d())):
        W = w.to(torch.float64)
        B = None if b is None else b.to(torch.float64)
        gram = grams[g] if grams is not None else None
        H = gram.H if gram is not None else None
        if gram is not None:
            dev = H.device if H is not None else gram.norms.device
            W, B = W.to(dev), (None if B is None else B.to(dev))
            rows = max(rows, gram.rows)
        zeros = (W == 0) if opts["keep_zeros"] else None
        d = W.shape[1]
        if method == "magnitude":
            keep = sel(magnitude_score(W))
        elif method == "wanda":
            keep = sel(wanda_score(W, gram.norms if H is None else H.diagonal()[:d]))
        elif method == "sparsegpt":
            Wn, keep = sparsegpt(W, H[:d, :d], n, m, sel, forced=zeros, damp=opts["damp"],
                                 blocksize=opts["blocksize"], dtype=getattr(torch, opts.get("precision") or "float64"))
            Wn = Wn.to(torch.float64)
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
        if gram is not None:
            e = _errors(W_aug, masked, final, gram, update=method not in ("magnitude", "wanda"))
            den, num_before, num_after = den + e[0], num_before + e[1], num_after + e[2]
        new_w.append(final[:, :d])
        new_b.append(None if B is None else final[:, d])
    weight = geom.assemble(new_w)
    param = getattr(module, name)
    param.copy_(weight.to(device=param.device, dtype=param.dtype))
    if geom.has_bias:
        bias = getattr(module, geom.bias_name)
        bias.copy_(torch.cat(new_b).to(device=bias.device, dtype=bias.dtype))
    if not target_is_nm(param, module, name, pattern, layout=layout):  # pragma: no cover - a bug if it happens
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
