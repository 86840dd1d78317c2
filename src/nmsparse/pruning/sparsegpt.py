"""SparseGPT (Frantar and Alistarh, 2023): N:M pruning with an OBS weight update.

Per layer, the Hessian of the reconstruction error ``H = X^T X`` (from the calibration inputs) is
dampened (``H + damp * mean(diag(H)) * I``), its inverse is Cholesky-factored (upper), and the
columns are visited in blocks: at the first column of each group of M, the mask of that group keeps
the N weights of largest ``w^2 / [H^-1]_jj^2``; each pruned weight's error is then spread over the
columns not yet visited through the rows of the inverse Hessian factor. Follows the reference
implementation, with one difference: weights of input features that are zero on every calibration
input ("dead") are kept as they are instead of being zeroed, since a small calibration set says
nothing about them. The bias is not changed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


def sparsegpt(
    w: torch.Tensor,
    H: torch.Tensor,
    n: int,
    m: int,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    forced: torch.Tensor | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w`` (``(out, D)``, groups of M consecutive columns) against Hessian ``H`` (``(D, D)``).

    ``select(score)`` maps an ``(out, m)`` score block to its keep-mask (N:M per row, or transposable).
    ``forced`` (bool, ``w``'s shape) marks weights that must be pruned (existing zeros). ``dtype``: of
    the factorizations and the column loop (float64 or float32). Returns the updated weight (``dtype``,
    zeros where pruned) and the keep-mask.
    """
    out, d = w.shape
    W = w.detach().to(dtype).clone()
    H = H.detach().to(device=W.device, dtype=dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:  # pragma: no cover - only with pathological inputs
        H.diagonal().add_(H.diagonal().mean() * 0.1 + 1e-8)
        L = torch.linalg.cholesky(H)
    del H  # the (D, D) float64 temporaries are freed as soon as the next one exists (D = 5632: 242 MiB each)
    with _one_thread(True):  # LAPACK potri: ~50x slower on two threads than on one (2-core machine, torch 2.13)
        Hinv = torch.cholesky_inverse(L)
    del L
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    bs = max(m, (blocksize // m) * m)
    # Work on the transpose, so that a column of W is a contiguous row (much faster on CPUs).
    Wt = W.t().contiguous()
    forced_t = None if forced is None else forced.t().contiguous()
    prune_t = torch.zeros(d, out, dtype=torch.bool, device=W.device)
    for i1 in range(0, d, bs):
        i2 = min(i1 + bs, d)
        W1 = Wt[i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        hdiag = Hinv1.diagonal()
        mask1 = prune_t[i1:i2]
        with _one_thread(W1.numel() <= SMALL_BLOCK):
            _columns(W1, Q1, Err1, Hinv1, hdiag, mask1, forced_t, i1, i2, m, select)
        Wt[i1:i2] = Q1
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1
    W = Wt.t()
    prune = prune_t.t()
    keep = ~prune
    return W * keep, keep


# Column blocks of at most this many elements (blocksize x out) are updated on one thread.
SMALL_BLOCK = 1 << 18


@contextlib.contextmanager
def _one_thread(small: bool) -> Iterator[None]:
    """Run the column loop's small operations (a rank-1 update of at most blocksize x out) on one thread
    when ``small``: the intra-op thread pool's start-up costs more than the work (10-100x on a busy
    2-core machine). Element-wise operations: the same bits on any number of threads."""
    old = torch.get_num_threads()
    if old == 1 or not small:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _columns(W1, Q1, Err1, Hinv1, hdiag, mask1, forced_t, i1, i2, m, select) -> None:
    """The column-by-column part of one block of columns (in place on W1, Q1, Err1, mask1)."""
    for i in range(i2 - i1):
        if i % m == 0:
            score = (W1[i:i + m] ** 2 / hdiag[i:i + m].unsqueeze(1) ** 2).t()
            if forced_t is not None:
                f = forced_t[i1 + i:i1 + i + m]
                score = score.masked_fill(f.t(), 0.0)
                mask1[i:i + m] = ~select(score).t() | f
            else:
                mask1[i:i + m] = ~select(score).t()
        col = W1[i]
        q = col.masked_fill(mask1[i], 0.0)
        Q1[i] = q
        err = (col - q) / Hinv1[i, i]
        W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
        Err1[i] = err
