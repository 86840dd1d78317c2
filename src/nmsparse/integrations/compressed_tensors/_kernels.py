"""Compiled CPU kernel (numba) for :func:`bitmask.decompress24`. Private.

One pass per row over the integer bit patterns of the values (uint8/uint16/uint32 views: one kernel
for float8, 16-bit and 32-bit floats): each mask byte holds two groups of 4 (low nibble first); the
2 stored values of a group go to its set bits, in order, every other entry is written zero. A group whose popcount is not 2 is recorded
(first one per row) and the caller raises; the output is then discarded.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from nmsparse.plumbing import numba_pool as _numba_pool


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _decompress24(vals, mask, out, bad):  # pragma: no cover - compiled
    rows, cols = out.shape
    groups = cols // 4
    for r in numba.prange(rows):
        for g in range(groups):
            nib = (mask[r, g >> 1] >> ((g & 1) * 4)) & 0xF
            k = 0
            for i in range(4):  # every entry written (the output starts uninitialised): one pass
                if (nib >> i) & 1 and k < 2:
                    out[r, 4 * g + i] = vals[r, 2 * g + k]
                    k += 1
                else:
                    out[r, 4 * g + i] = 0
                    k += (nib >> i) & 1
            if k != 2 and bad[r] < 0:
                bad[r] = g


_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def decompress24_cpu(compressed: torch.Tensor, bitmask: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, int, int]:
    """``(dense, row, group)``: the dense ``(rows, cols)`` tensor, and the first row and group whose
    popcount is not 2 (``-1, -1`` when none)."""
    view = _VIEWS[compressed.element_size()]
    out = torch.empty((rows, cols), dtype=compressed.dtype)
    bad = np.full(rows, -1, np.int64)
    vals = compressed.contiguous().view(view).numpy()
    _numba_pool.run(_decompress24, vals, bitmask.contiguous().numpy(), out.view(view).numpy(), bad)
    hit = np.nonzero(bad >= 0)[0]
    return (out, int(hit[0]), int(bad[hit[0]])) if hit.size else (out, -1, -1)
