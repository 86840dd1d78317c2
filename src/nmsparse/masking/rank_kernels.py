"""Compiled CPU kernels (numba). Private: call them through :mod:`nmsparse.masking.nm`.

The rank kernel is specialised per group size ``m`` (a closure constant, which numba folds into the
code and into its on-disk cache key, so each m compiles once per machine) so the inner loops unroll; that makes a 2:4 mask about as fast
as one ``abs()`` pass over the tensor (see ``benchmarks/bench_masks.py``).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from nmsparse.plumbing import numba_pool as _numba_pool

_CHUNK = 1 << 12  # groups per parallel work item


@functools.lru_cache(maxsize=None)
def _rank_kernel(m: int):
    """Kernel writing ``out[g*m + i] = rank of entry i in group g < n`` (ties to the lower index).

    For m <= 4 each entry counts the entries ranked before it (fastest when everything fits in
    registers); for larger m each pair is compared once and both ranks updated (half the work).
    """
    if m <= 4:

        @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
        def count_kernel(bits, out, n, abs_bits, nan_key):  # pragma: no cover - compiled
            groups = bits.size // m
            chunks = (groups + _CHUNK - 1) // _CHUNK
            for c in numba.prange(chunks):
                stop = min(groups, (c + 1) * _CHUNK)
                for g in range(c * _CHUNK, stop):
                    base = g * m
                    for i in range(m):
                        ki = min(bits[base + i] & abs_bits, nan_key)
                        rank = 0
                        for j in range(m):
                            kj = min(bits[base + j] & abs_bits, nan_key)
                            if j < i:
                                rank += kj >= ki
                            elif j > i:
                                rank += kj > ki
                        out[base + i] = rank < n

        return count_kernel

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def pair_kernel(bits, out, n, abs_bits, nan_key):  # pragma: no cover - compiled
        groups = bits.size // m
        chunks = (groups + _CHUNK - 1) // _CHUNK
        for c in numba.prange(chunks):
            key = np.empty(m, bits.dtype)
            rank = np.empty(m, np.int32)
            stop = min(groups, (c + 1) * _CHUNK)
            for g in range(c * _CHUNK, stop):
                base = g * m
                for i in range(m):
                    key[i] = min(bits[base + i] & abs_bits, nan_key)
                    rank[i] = 0
                for i in range(m):
                    for j in range(i + 1, m):
                        later_wins = np.int32(key[j] > key[i])  # on a tie the lower index i wins
                        rank[i] += later_wins
                        rank[j] += 1 - later_wins
                for i in range(m):
                    out[base + i] = rank[i] < n

    return pair_kernel


def nm_mask_cpu(x: torch.Tensor, n: int, m: int, int_dtype: torch.dtype, abs_bits: int, inf_key: int):
    """Keep-mask of a contiguous CPU float tensor whose last dimension is grouped by ``m``."""
    bits = x.view(int_dtype).reshape(-1).numpy()
    out = torch.empty(x.shape, dtype=torch.bool)
    flat = out.view(-1).numpy()
    ab, nan_key = bits.dtype.type(abs_bits), bits.dtype.type(inf_key + 1)
    _numba_pool.run(_rank_kernel(m), bits, flat, n, ab, nan_key)  # torch's thread count, restored after
    return out
