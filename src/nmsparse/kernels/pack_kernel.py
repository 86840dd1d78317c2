"""The compiled packer behind :func:`nmsparse.kernels.cpu_nm.pack`: one pass over the weight's bits.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.

Plain loops (no intrinsics), parallel over rows, on the weight's integer view (float32 as int32,
bfloat16 as int16), so values are copied bit for bit: a weight is non-zero when its bits without the
sign bit are not all zero (NaN and inf count, ``-0.0`` does not), as ``weight != 0`` says.
"""

from __future__ import annotations

import numba
import numpy as np

CHUNK = 16


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def pack_rows(bits, in_f, n, m, absmask, values, masks, bad):  # pragma: no cover - compiled
    """Pack each row of ``bits`` (``rows * in_f`` integers) into ``values`` (``rows * in_f*n/m``) and
    ``masks`` (``rows * ceil(in_f/16)``, uint16); ``bad[r] = g * (m + 1) + count`` + 1 for the first group
    ``g`` of row ``r`` with more than n non-zeros (0: none; the row is then left half-written)."""
    rows = bad.size
    nchunks = (in_f + CHUNK - 1) // CHUNK
    per_row = in_f * n // m
    for r in numba.prange(rows):
        src = r * in_f
        out = r * per_row
        for c in range(nchunks):
            masks[r * nchunks + c] = 0
        for g in range(in_f // m):
            base = src + g * m
            count = 0
            for j in range(m):
                if bits[base + j] & absmask:
                    count += 1
            if count > n:
                bad[r] = g * (m + 1) + count + 1
                break
            need = n - count
            for j in range(m):
                col = g * m + j
                nz = (bits[base + j] & absmask) != 0
                if nz or need > 0:
                    if nz:
                        values[out] = bits[base + j]
                    else:
                        values[out] = 0
                        need -= 1
                    out += 1
                    word = r * nchunks + col // CHUNK
                    masks[word] |= np.uint16(1 << (col % CHUNK))
