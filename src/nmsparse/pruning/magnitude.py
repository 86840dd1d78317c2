"""One-shot N:M by magnitude (what NVIDIA's ASP does before fine-tuning), and the mask selection
shared by every method: keep the N largest scores in every group of M consecutive columns of a
``(out, D)`` score matrix, or a transposable N:M mask (N kept per M along both axes, in every
aligned M x M tile) when asked."""

from __future__ import annotations

import torch

from nmsparse.masking.nm import check_nm, nm_mask
from nmsparse.masking.pattern import NMPattern


def transposable_fn():
    """``nmsparse.masking.transposable.transposable_mask``, imported on first use."""
    try:
        from nmsparse.masking.transposable import transposable_mask
    except ImportError as e:  # pragma: no cover - depends on the transposable module being installed
        raise ImportError(
            "transposable=True needs nmsparse.masking.transposable (transposable N:M masks), which could not be "
            f"imported: {e}"
        ) from e
    return transposable_mask


def select(
    score: torch.Tensor,
    n: int | NMPattern,
    m: int | None = None,
    *,
    transposable: bool = False,
    transposable_method: str | None = None,
) -> torch.Tensor:
    """Keep-mask of a ``(out, D)`` score: N of every M consecutive columns (rows' groups), or
    transposable N:M over aligned M x M tiles (``n`` may be an :class:`NMPattern`, ``m`` left out).
    Returns a bool tensor of ``score``'s shape."""
    p = check_nm(n, m)
    n, m = p
    if transposable:
        fn = transposable_fn()
        kw = {} if transposable_method is None else {"method": transposable_method}
        return fn(score, p, m, **kw).to(torch.bool)
    if score.shape[1] == m and score.numel() < (1 << 16):  # one group per row (SparseGPT's blocks): topk
        idx = score.nan_to_num(nan=float("inf")).topk(n, dim=1, sorted=False).indices
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(1, idx, True)
    return nm_mask(score, p, dim=1)


def magnitude_score(w: torch.Tensor) -> torch.Tensor:
    return w.abs()
