"""The finest N:M pattern a tensor satisfies along one axis (pure tensor functions).

N is the number of non-zeros KEPT in every group of M consecutive entries. A tensor that is 2:4 is also
4:8 and 8:16; the *finest* pattern is the one of lowest density ``n/m``, and among equal densities the
smallest ``m`` (2:4 rather than 4:8). 1:4 is finer than 2:4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmsparse.masking.nm import is_nm
from nmsparse.masking.transposable import is_transposable_nm

M_CANDIDATES = (4, 8, 16)


@dataclass
class Pattern:
    """``label``: "2:4", "dense", "unstructured 37.5% zeros" or "all zeros"; ``n``/``m`` when N:M;
    ``zeros``: fraction of zero entries; ``transposable``: whether the 2-D tensor is N:M along both
    axes (None when not N:M, not 2-D, or a side is not a multiple of m); ``two_four``: at most 2
    non-zeros in every group of 4 along the axis (what 2:4 kernels need), true also of finer patterns
    that are not reported as 2:4 (1:8, 2:8, 2:16...)."""

    label: str
    n: int | None
    m: int | None
    zeros: float
    transposable: bool | None = None
    two_four: bool = False


def nonzero(t: torch.Tensor) -> torch.Tensor:
    """Bool tensor: where ``t`` is not zero (any dtype, float8 included; NaN counts as non-zero)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return (t.view(torch.uint8) & 0x7F) != 0  # +0 and -0 are the only zeros
    return t != 0


def finest_pattern(t: torch.Tensor, dim: int) -> Pattern:
    """The finest N:M pattern of ``t`` along ``dim`` (m in 4, 8, 16 dividing that size), else "dense"
    (no zero) or "unstructured x% zeros"."""
    nz = nonzero(t.detach())
    numel = nz.numel()
    zeros = 1.0 - (float(nz.sum()) / numel if numel else 0.0)
    if numel == 0:
        return Pattern("empty", None, None, 0.0)
    if zeros == 1.0:
        return Pattern("all zeros", None, None, 1.0)
    g = nz.movedim(dim, -1)
    best: tuple[float, int, int] | None = None
    two_four = False
    for m in M_CANDIDATES:
        if g.shape[-1] % m:
            continue
        n = int(g.reshape(-1, m).sum(-1).max())
        two_four = two_four or (m == 4 and n <= 2)
        if n < m and (best is None or (n / m, m) < (best[0], best[1])):
            best = (n / m, m, n)
    if best is None:
        return Pattern("dense" if zeros == 0 else f"unstructured {100 * zeros:.1f}% zeros", None, None, zeros)
    _, m, n = best
    assert is_nm(nz, n, m, dim=dim)
    trans = None
    if nz.dim() == 2 and nz.shape[0] % m == 0 and nz.shape[1] % m == 0:
        trans = is_transposable_nm(nz, n, m)
    return Pattern(f"{n}:{m}", n, m, zeros, trans, two_four)
