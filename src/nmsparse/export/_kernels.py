"""Compiled CPU kernels (numba) for :mod:`nmsparse.export.compress`. Private.

Both kernels work on the integer bit patterns of the float values (so every float width is one
integer kernel and NaN payloads survive) and split the groups into chunks of ``_CHUNK`` groups, a
multiple of 8, so that each chunk's index bits start on a byte boundary and chunks run in parallel.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

_CHUNK = 1 << 12  # groups per parallel work item; a multiple of 8


@functools.lru_cache(maxsize=None)
def _compress_kernel(n: int, m: int):
    """Compression kernel specialised for ``n`` and ``m`` (closure constants numba folds into the code
    and into its on-disk cache key), so the loops over a group unroll."""
    b = (m - 1).bit_length()
    per_group = n * b <= 56  # a whole group's positions fit in the 64-bit accumulator next to < 8 bits

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(bits, values, index, bad, abs_bits):  # pragma: no cover - compiled
        groups = bits.size // m
        chunks = (groups + _CHUNK - 1) // _CHUNK
        for c in numba.prange(chunks):
            g0 = c * _CHUNK
            stop = min(groups, g0 + _CHUNK)
            out = (g0 * n * b) // 8
            tmp = np.empty(m + 1, bits.dtype)
            acc = np.uint64(0)
            nb = 0
            for g in range(g0, stop):
                base = g * m
                count = 0
                for i in range(m):
                    count += (bits[base + i] & abs_bits) != 0
                if count > n:
                    bad[c] = g
                    break
                need = n - count
                k = 0
                for i in range(m):  # branch-free: which entries are kept is data-dependent
                    v = bits[base + i]
                    nz = np.int64((v & abs_bits) != 0)
                    take = nz | np.int64(need > 0)
                    need -= take & (1 - nz)
                    tmp[k] = v
                    k += take
                    acc |= np.uint64(i * take) << np.uint64(nb)
                    nb += b * take
                    if not per_group:
                        while nb >= 8:
                            index[out] = np.uint8(acc & np.uint64(0xFF))
                            acc >>= np.uint64(8)
                            out += 1
                            nb -= 8
                for j in range(n):
                    values[g * n + j] = tmp[j]
                if per_group:
                    while nb >= 8:
                        index[out] = np.uint8(acc & np.uint64(0xFF))
                        acc >>= np.uint64(8)
                        out += 1
                        nb -= 8
            while nb > 0 and bad[c] < 0:
                index[out] = np.uint8(acc & np.uint64(0xFF))
                acc >>= np.uint64(8)
                out += 1
                nb -= 8

    return kernel


@functools.lru_cache(maxsize=None)
def _decompress_kernel(n: int, m: int):
    """Decompression kernel specialised for ``n`` and ``m``."""
    b = (m - 1).bit_length()
    per_group = n * b <= 56  # a whole group's positions fit in the 64-bit accumulator next to < 8 bits

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(values, index, out, bad):  # pragma: no cover - compiled
        groups = out.size // m
        chunks = (groups + _CHUNK - 1) // _CHUNK
        mask = np.uint64((1 << b) - 1)
        zero = out.dtype.type(0)
        nbytes = index.size
        for c in numba.prange(chunks):
            g0 = c * _CHUNK
            stop = min(groups, g0 + _CHUNK)
            pos_byte = (g0 * n * b) // 8
            acc = np.uint64(0)
            nb = 0
            for g in range(g0, stop):
                base = g * m
                if per_group:
                    while nb < n * b:
                        if pos_byte < nbytes:
                            acc |= np.uint64(index[pos_byte]) << np.uint64(nb)
                        pos_byte += 1
                        nb += 8
                for i in range(m):
                    out[base + i] = zero
                prev = -1
                ok = True
                for j in range(n):
                    if not per_group:
                        while nb < b:
                            if pos_byte < nbytes:
                                acc |= np.uint64(index[pos_byte]) << np.uint64(nb)
                            pos_byte += 1
                            nb += 8
                    p = np.int64(acc & mask)
                    acc >>= np.uint64(b)
                    nb -= b
                    ok &= (p > prev) & (p < m)
                    prev = p
                    out[base + min(p, m - 1)] = values[g * n + j]
                if not ok:
                    bad[c] = g
                    break

    return kernel


def _restore_threads(torch_threads: int) -> None:
    # numba's OpenMP pool, when it starts, sets the process-wide OpenMP thread count to its own;
    # that would silently change torch's thread count under the caller.
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def _first_bad(bad: np.ndarray) -> int:
    hit = bad[bad >= 0]
    return int(hit.min()) if hit.size else -1


def compress_cpu(bits: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int, b: int,
                 abs_bits: int) -> int:
    """Fill ``values`` (integer view, 1-D) and ``index`` (uint8) from the 1-D integer view ``bits``.

    Returns the first group with more than ``n`` non-zeros, or -1."""
    a = bits.numpy()
    chunks = (a.size // m + _CHUNK - 1) // _CHUNK
    bad = np.full(chunks, -1, np.int64)
    threads = torch.get_num_threads()
    _compress_kernel(n, m)(a, values.numpy(), index.numpy(), bad, a.dtype.type(abs_bits))
    _restore_threads(threads)
    return _first_bad(bad)


def decompress_cpu(values: torch.Tensor, index: torch.Tensor, out: torch.Tensor, n: int, m: int, b: int) -> int:
    """Fill ``out`` (integer view, 1-D) from ``values`` (integer view, 1-D) and ``index`` (uint8).

    Returns the first group whose positions are out of range or not increasing, or -1."""
    o = out.numpy()
    chunks = (o.size // m + _CHUNK - 1) // _CHUNK
    bad = np.full(chunks, -1, np.int64)
    threads = torch.get_num_threads()
    _decompress_kernel(n, m)(values.numpy(), index.numpy(), o, bad)
    _restore_threads(threads)
    return _first_bad(bad)
