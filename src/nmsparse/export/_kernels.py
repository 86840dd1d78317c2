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


TABLE_MAX_M = 8  # up to here compression looks each group's non-zero pattern up in a 2**m-entry table


@functools.lru_cache(maxsize=None)
def pattern_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For every non-zero pattern ``p`` of a group (bit i set = entry i non-zero): ``pos[p]``, the n
    stored positions (the non-zeros, padded with the lowest zero positions, ascending), and
    ``code[p]``, those positions packed LSB-first at ``b`` bits each; ``code[p] = -1`` when the
    pattern has more than n non-zeros."""
    b = (m - 1).bit_length()
    pos = np.zeros((1 << m, n), np.int64)
    code = np.full(1 << m, -1, np.int64)
    for p in range(1 << m):
        nz = [i for i in range(m) if p >> i & 1]
        if len(nz) > n:
            continue
        zeros = [i for i in range(m) if not p >> i & 1]
        kept = sorted(nz + zeros[: n - len(nz)])
        pos[p] = kept
        code[p] = sum(k << (j * b) for j, k in enumerate(kept))
    return pos, code


@functools.lru_cache(maxsize=None)
def _compress_table_kernel(n: int, m: int):
    """Compression by table look-up of each group's non-zero pattern (m <= TABLE_MAX_M): branch-free
    and a few operations per group, so it keeps up with memory for 16-bit floats too."""
    b = (m - 1).bit_length()
    width = n * b  # <= 7 * 3 = 21 bits per group: always fits next to < 8 pending bits

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(bits, values, index, bad, abs_bits, pos, code):  # pragma: no cover - compiled
        groups = bits.size // m
        chunks = (groups + _CHUNK - 1) // _CHUNK
        for c in numba.prange(chunks):
            g0 = c * _CHUNK
            stop = min(groups, g0 + _CHUNK)
            out = (g0 * width) // 8
            acc = np.uint64(0)
            nb = 0
            for g in range(g0, stop):
                base = g * m
                p = 0
                for i in range(m):
                    p |= np.int64((bits[base + i] & abs_bits) != 0) << i
                k = code[p]
                if k < 0:
                    bad[c] = g
                    break
                for j in range(n):
                    values[g * n + j] = bits[base + pos[p, j]]
                acc |= np.uint64(k) << np.uint64(nb)
                nb += width
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


TABLE_MAX_CODE_BITS = 12  # up to here decompression looks each group's packed positions up in a table


@functools.lru_cache(maxsize=None)
def code_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For every packed group code (n positions of b bits): ``pos[code]``, the positions, and
    ``valid[code]``, 1 when they are strictly increasing and below m."""
    b = (m - 1).bit_length()
    size = 1 << (n * b)
    pos = np.zeros((size, n), np.int64)
    valid = np.zeros(size, np.uint8)
    for code in range(size):
        ps = [(code >> (j * b)) & ((1 << b) - 1) for j in range(n)]
        pos[code] = [min(p, m - 1) for p in ps]
        valid[code] = all(p < m for p in ps) and all(x < y for x, y in zip(ps, ps[1:]))
    return pos, valid


@functools.lru_cache(maxsize=None)
def _decompress_table_kernel(n: int, m: int):
    """Decompression by table look-up of each group's packed code (n * b <= TABLE_MAX_CODE_BITS)."""
    b = (m - 1).bit_length()
    width = n * b

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(values, index, out, bad, pos, valid):  # pragma: no cover - compiled
        groups = out.size // m
        chunks = (groups + _CHUNK - 1) // _CHUNK
        mask = np.uint64((1 << width) - 1)
        zero = out.dtype.type(0)
        nbytes = index.size
        for c in numba.prange(chunks):
            g0 = c * _CHUNK
            stop = min(groups, g0 + _CHUNK)
            pos_byte = (g0 * width) // 8
            acc = np.uint64(0)
            nb = 0
            for g in range(g0, stop):
                while nb < width:
                    if pos_byte < nbytes:
                        acc |= np.uint64(index[pos_byte]) << np.uint64(nb)
                    pos_byte += 1
                    nb += 8
                code = np.int64(acc & mask)
                acc >>= np.uint64(width)
                nb -= width
                if valid[code] == 0:
                    bad[c] = g
                    break
                base = g * m
                for i in range(m):
                    out[base + i] = zero
                for j in range(n):
                    out[base + pos[code, j]] = values[g * n + j]

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
    if m <= TABLE_MAX_M:
        _compress_table_kernel(n, m)(a, values.numpy(), index.numpy(), bad, a.dtype.type(abs_bits),
                                     *pattern_table(n, m))
    else:
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
    if n * ((m - 1).bit_length()) <= TABLE_MAX_CODE_BITS:
        _decompress_table_kernel(n, m)(values.numpy(), index.numpy(), o, bad, *code_table(n, m))
    else:
        _decompress_kernel(n, m)(values.numpy(), index.numpy(), o, bad)
    _restore_threads(threads)
    return _first_bad(bad)
