"""Exact transposable 2:4 masks by enumeration, for CUDA: the best of the 90 transposable 4x4 patterns
of every tile, scored in batched float64 matmuls, with no host round trip.

It gives the optimum of the min-cost-flow solver; on exact ties between optimal masks it may pick
another one than the CPU kernel.
"""

from __future__ import annotations

import itertools

import torch

from nmsparse.masking.transposable.torch_path import _untile


def _patterns_24() -> torch.Tensor:
    """The 90 bool 4x4 patterns with two True in every row and column, as (90, 16). The first is the
    solver's own answer for a constant tile (row i keeps columns i and i+1 mod 4), so zero and constant
    tiles get the same mask as on the CPU."""
    pairs = list(itertools.combinations(range(4), 2))
    first = [[1 if j in (i, (i + 1) % 4) else 0 for j in range(4)] for i in range(4)]
    pats = [first]
    for rows in itertools.product(pairs, repeat=4):
        p = [[1 if j in r else 0 for j in range(4)] for r in rows]
        if all(sum(p[i][j] for i in range(4)) == 2 for j in range(4)) and p != first:
            pats.append(p)
    return torch.tensor(pats, dtype=torch.bool).reshape(len(pats), 16)


_PATTERNS_24: dict[torch.device, torch.Tensor] = {}  # per device: a copy from host memory waits for the GPU
_OPT24_CHUNK = 1 << 18  # tiles per matmul: bounds the (tiles, 90) float64 scores to 189 MB


def _optimal_24(w: torch.Tensor) -> torch.Tensor:
    """Exact transposable 2:4 masks of a (B, R, C) tensor on any device, without a host round trip:
    every tile's kept ``sum |w|`` under each of the 90 patterns is one float64 matmul, and the best
    pattern wins (ties to the earlier pattern, so a tie may pick another optimal mask than the
    min-cost-flow solver; the kept sum is the same up to float64 rounding). Non-finite entries get the
    value ``2*m*m*(F+1)`` as in the solver."""
    pats = _PATTERNS_24.get(w.device)
    if pats is None:
        pats = _PATTERNS_24[w.device] = _patterns_24().to(w.device)
    nb, nr, nc = w.shape
    a = w.abs().to(torch.float64).reshape(nb, nr // 4, 4, nc // 4, 4).permute(0, 1, 3, 2, 4).reshape(-1, 16)
    bad = ~torch.isfinite(a)
    top = a.masked_fill(bad, 0.0).amax(1, keepdim=True)
    a = torch.where(bad, (top + 1.0) * 32.0, a)
    pf = pats.to(torch.float64).t()
    best = torch.cat([(a[s : s + _OPT24_CHUNK] @ pf).argmax(1) for s in range(0, a.shape[0], _OPT24_CHUNK)])
    return _untile(pats[best].reshape(-1, 4, 4), w.shape, 4)
