"""AdaPrune (Hubara et al., 2021): keep an N:M mask and refit the kept weights (and the bias) of
each layer to the dense layer's outputs on the calibration inputs,

    minimise || W X - (E * W') X ||^2   (plus the bias terms),

where ``X`` is the layer's input in the already-pruned model. Two solvers of this one objective:

* :func:`exact_solve`: the closed form per output row on its kept support ``S``,
  ``w'_S = (H_SS + lambda I)^-1 ((H w)_S + lambda w_S)`` with ``H = X^T X`` (a ones column appended
  for the bias): least squares with a ridge ``lambda ||w' - w||^2`` that pulls towards the dense
  weights, ``lambda = damp * mean(diag(H))``. An input feature the calibration data never excites
  keeps its dense weight (a ridge towards zero would zero it). Rows are solved in batches (Cholesky).
* :func:`adam_solve`: the paper's solver, Adam (lr 1e-3 for weights, 1e-2 for the bias) for a
  number of iterations over mini-batches of calibration samples, on the mean squared error. Since
  the loss is quadratic, a mini-batch's loss and gradient depend on its inputs only through its Gram
  matrix ``H_b``, so each iteration costs ``out * D^2`` whatever the number of positions or tokens,
  and gives the same iterates as Adam on the cached inputs would (mini-batches are fixed runs of
  ``batch`` consecutive samples, visited in a new random order every epoch).

All matrices here are in the augmented form: weight columns then, if the layer has a bias, one bias
column that is always kept.
"""

from __future__ import annotations

import torch

# Elements of the batched (rows, k, k) systems formed at once by exact_solve.
_SOLVE_ELEMS = 1 << 25


def ridge(H: torch.Tensor, damp: float) -> float:
    """The ridge ``lambda = damp * mean(diag(H))`` (``damp`` itself if H's diagonal is zero)."""
    mean = float(H.diagonal().mean()) if H.numel() else 0.0
    return damp * mean if mean > 0 else float(damp)


def exact_solve(w: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Ridge least squares per row of ``w`` (``(out, Da)``) on its support ``keep`` (bool, same shape):
    for each row ``r``, the ``v`` with support ``keep[r]`` minimising
    ``(v - w_r)^T H (v - w_r) + lambda |v - w_r|^2``, i.e. ``||X v - X w_r||^2 + lambda |v - w_r|^2``
    for ``H = X^T X``, with ``lambda = damp * mean(diag(H))``.
    ``damp = 0`` gives plain least squares (H must then be non-singular on each support).
    Returns a float64 tensor, zero off the support."""
    W = w.detach().to(torch.float64)
    H = H.detach().to(device=W.device, dtype=torch.float64)
    keep = keep.to(W.device)
    out, da = W.shape
    lam = ridge(H, damp) if damp else 0.0
    G = W @ H + lam * W  # row r: (H w_r + lambda w_r)^T, H symmetric
    counts = keep.sum(1)
    k = int(counts.max()) if out else 0
    result = torch.zeros_like(W)
    if k == 0:
        return result
    # kept indices of each row first (ascending), then pruned ones as padding
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=W.device).unsqueeze(0) < counts.unsqueeze(1)
    step = max(1, _SOLVE_ELEMS // (k * k))
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        I, V = idx[r0:r1], valid[r0:r1]
        A = H[I.unsqueeze(2), I.unsqueeze(1)]
        if bool(V.all()):  # every row keeps k (the usual N:M case)
            A.diagonal(dim1=1, dim2=2).add_(lam)
            rhs = G[r0:r1].gather(1, I).unsqueeze(2)
        else:  # padded entries: identity rows and columns, zero right-hand side
            vv = V.unsqueeze(2) & V.unsqueeze(1)
            A.mul_(vv)
            A.diagonal(dim1=1, dim2=2).add_(torch.where(V, lam, 1.0).to(torch.float64))
            rhs = (G[r0:r1].gather(1, I) * V).unsqueeze(2)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info == 0).all()):
            sol = torch.cholesky_solve(rhs, L)
        else:  # singular support without ridge: least-squares solution
            sol = torch.linalg.lstsq(A, rhs).solution
        result[r0:r1].scatter_(1, I, sol.squeeze(2) * V)
    return result


def adam_solve(
    w: torch.Tensor,
    keep: torch.Tensor,
    bins: list[tuple[torch.Tensor, int]],
    *,
    bias: bool,
    iterations: int = 1000,
    lr: float = 1e-3,
    bias_lr: float = 1e-2,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adam on the mean squared error ``||(W' - W) X_b||^2 / (rows_b * out)`` over mini-batch Gram
    matrices ``bins = [(H_b, rows_b), ...]`` (augmented; the last column is the bias if ``bias``).
    Starts from ``init`` (default ``keep * w``); gradients of pruned entries are zero. Returns float32."""
    W = w.detach().float()
    keep = keep.to(W.device)
    kf = keep.float()
    P = (W if init is None else init.detach().float()) * kf
    out, da = W.shape
    lrs = torch.full((da,), lr, dtype=torch.float32, device=W.device)
    if bias:
        lrs[-1] = bias_lr
    m1 = torch.zeros_like(P)
    v = torch.zeros_like(P)
    bins = [(h.to(W.device, torch.float32), int(r)) for h, r in bins if int(r) > 0]
    if not bins or iterations <= 0:
        return P
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    # Adam's moment estimates decay into subnormal floats, which are very slow on CPUs.
    flush = torch.set_flush_denormal(True)
    try:
        _adam_loop(P, W, kf, lrs, m1, v, bins, iterations, gen, order, out)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return P * kf


def _adam_loop(P, W, kf, lrs, m1, v, bins, iterations, gen, order, out) -> None:
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, iterations + 1):
        if not order:
            order = torch.randperm(len(bins), generator=gen).tolist()
        Hb, rows = bins[order.pop()]
        g = (P - W) @ Hb
        g.mul_(2.0 / (rows * out)).mul_(kf)
        m1.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = (m1 / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
        P.sub_(step * lrs)
