"""Compiled CPU kernels (numba) for :mod:`nmsparse.export.compress`. Private.

The kernels work on the integer bit patterns of the float values (so every float width is one
integer kernel and NaN payloads survive) and split the groups into chunks of ``_CHUNK`` groups, a
multiple of 8, so that each chunk's index bits start on a byte boundary and chunks run in parallel.

Inside a chunk the fast kernels step by *units*: ``U`` consecutive groups whose ``U * n * b`` index
bits fill whole bytes (``U = 8 / gcd(n * b, 8)``: 2 groups per byte for 2:4, 2 groups per 3 bytes for
4:8). Every bit offset inside a unit is then a compile-time constant, so packing and unpacking
unroll into straight-line shifts with no per-bit bookkeeping, and the loop over groups carries no
data-dependent branch (a bad group only sets a flag; the chunk is then scanned again for the
first one). The last ``< U`` groups of the tensor take the same per-group code with a running
byte cursor.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch

from nmsparse.plumbing import numba_pool as _numba_pool

_CHUNK = 1 << 12  # groups per parallel work item; a multiple of 8


def _unit(n: int, m: int) -> tuple[int, int, int, int]:
    """``(b, w, u, ub)``: bits per position, bits per group, groups per unit, bytes per unit."""
    b = (m - 1).bit_length()
    w = n * b
    u = 8 // math.gcd(w, 8)
    return b, w, u, u * w // 8


@functools.lru_cache(maxsize=None)
def _flusher(nbits: int):
    """``flush(index, out, acc, nb)``: write the complete low bytes of the ``nb``-bit accumulator
    ``acc`` to ``index[out:]``, keeping fewer than 8 bits (``nbits``: most bits pending at once)."""

    @numba.njit(inline="always", nogil=True, boundscheck=False)
    def flush(index, out, acc, nb):  # pragma: no cover - compiled
        for _ in range(nbits // 8):  # constant trip count: unrolled, the test below is folded
            if nb >= 8:
                index[out] = np.uint8(acc & 0xFF)
                acc >>= 8
                out += 1
                nb -= 8
        return out, acc, nb

    return flush


TABLE_MAX_M = 8  # up to here compression looks each group's non-zero pattern up in a 2**m-entry table


@functools.lru_cache(maxsize=None)
def pattern_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For every non-zero pattern ``p`` of a group (bit i set = entry i non-zero): ``pos[p*n + j]``,
    the n stored positions (the non-zeros, padded with the lowest zero positions, ascending), and
    ``code[p]``, those positions packed LSB-first at ``b`` bits each; ``code[p] = -1`` when the
    pattern has more than n non-zeros (its ``pos`` entries are 0)."""
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
    return pos.reshape(-1), code


@functools.lru_cache(maxsize=None)
def _compress_table_kernel(n: int, m: int, elem_bits: int):
    """Compression by table look-up of each group's non-zero pattern (m <= TABLE_MAX_M), unit by
    unit: a few branch-free operations per group. When a group spans whole 64-bit words
    (``m * elem_bits`` a multiple of 64) its pattern is computed a word at a time (``words``: a
    ``uint64`` view of ``bits``): per lane, adding the magnitude mask to the magnitude bits carries
    into the lane's top bit exactly when the entry is non-zero."""
    b, width, u, ub = _unit(n, m)  # width <= 7 * 3 = 21 bits: next to < 8 pending bits in an int64
    units_per_chunk = _CHUNK // u
    flush = _flusher(width + 7)
    lanes = 64 // elem_bits
    by_word = (m * elem_bits) % 64 == 0
    words_per_group = m * elem_bits // 64
    lane_abs = sum(((1 << (elem_bits - 1)) - 1) << (elem_bits * i) for i in range(lanes))
    lane_top = sum(1 << (elem_bits - 1 + elem_bits * i) for i in range(lanes))
    # gathers lane top bits (shifted down to bits 0, e, 2e, ...) into bits 64-lanes .. 63
    gather = sum(1 << (64 - lanes + i - elem_bits * i) for i in range(lanes))

    @numba.njit(inline="always", nogil=True, boundscheck=False)
    def group(bits, words, values, g, abs_bits, pos, code):  # pragma: no cover - compiled
        base = g * m
        p = 0
        if by_word:
            for w in range(words_per_group):
                x = words[np.uint64(g * words_per_group + w)]
                top = ((x & np.uint64(lane_abs)) + np.uint64(lane_abs)) & np.uint64(lane_top)
                top >>= np.uint64(elem_bits - 1)
                if lanes > 1:
                    top = (top * np.uint64(gather)) >> np.uint64(64 - lanes)
                p |= np.int64(top) << (w * lanes)
        else:
            for i in range(m):
                p |= np.int64((bits[np.uint64(base + i)] & abs_bits) != 0) << i
        for j in range(n):
            values[np.uint64(g * n + j)] = bits[np.uint64(base + pos[np.uint64(p * n + j)])]
        return code[np.uint64(p)]  # -1 (all bits set) for more than n non-zeros

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(bits, words, values, index, bad, abs_bits, pos, code):  # pragma: no cover - compiled
        groups = bits.size // m
        units = groups // u
        chunks = (groups + _CHUNK - 1) // _CHUNK
        for c in numba.prange(chunks):
            stop = min(groups, (c + 1) * _CHUNK)
            seen = 0  # OR of the codes: negative once a group had more than n non-zeros
            for t in range(c * units_per_chunk, min(units, (c + 1) * units_per_chunk)):
                out, acc, nb = t * ub, 0, 0
                for k in range(u):  # unrolled: every shift and flush below is a constant
                    code_k = group(bits, words, values, t * u + k, abs_bits, pos, code)
                    seen |= code_k
                    acc |= (code_k & ((1 << width) - 1)) << nb
                    nb += width
                    out, acc, nb = flush(index, out, acc, nb)
            out, acc, nb = units * ub, 0, 0
            for g in range(max(units * u, c * _CHUNK), stop):  # the last < u groups of the tensor
                code_k = group(bits, words, values, g, abs_bits, pos, code)
                seen |= code_k
                acc |= (code_k & ((1 << width) - 1)) << nb
                nb += width
                out, acc, nb = flush(index, out, acc, nb)
            if nb > 0:
                index[out] = np.uint8(acc)
            if seen < 0:
                for g in range(c * _CHUNK, stop):
                    count = 0
                    for i in range(m):
                        count += (bits[g * m + i] & abs_bits) != 0
                    if count > n:
                        bad[c] = g
                        break

    return kernel


@functools.lru_cache(maxsize=None)
def _compress_kernel(n: int, m: int):
    """Compression kernel for m > TABLE_MAX_M, specialised for ``n`` and ``m`` (closure constants numba
    folds into the code and into its on-disk cache key), so the loops over a group unroll."""
    b = (m - 1).bit_length()
    per_group = n * b <= 56  # a whole group's positions fit in the 64-bit accumulator next to < 8 bits
    flush = _flusher(n * b + 7 if per_group else b + 7)

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
                        out, acc, nb = flush(index, out, acc, nb)
                for j in range(n):
                    values[g * n + j] = tmp[j]
                if per_group:
                    out, acc, nb = flush(index, out, acc, nb)
            if nb > 0 and bad[c] < 0:
                index[out] = np.uint8(acc & np.uint64(0xFF))

    return kernel


UNIT_MAX_CODE_BITS = 56  # up to here decompression reads each group's packed positions as one integer


@functools.lru_cache(maxsize=None)
def _decompress_unit_kernel(n: int, m: int, elem_bits: int):
    """Decompression unit by unit (``n * b <= UNIT_MAX_CODE_BITS``): each group's code is read with
    constant shifts, every output entry is written once. When a group is exactly 64 bits
    (``m * elem_bits == 64``: 16-bit floats in groups of 4) ``out`` is a ``uint64`` view, one word per
    group, built from shifted values; otherwise ``out`` is the integer view and each group is
    zeroed, then its n values are stored at their positions."""
    b, width, u, ub = _unit(n, m)
    units_per_chunk = _CHUNK // u
    word = m * elem_bits == 64
    elem_mask = (1 << elem_bits) - 1

    @numba.njit(inline="always", nogil=True, boundscheck=False)
    def code_at(index, g):  # pragma: no cover - compiled
        """Group ``g``'s code, any g (bytes past the end read as 0); only for the tail and rescans."""
        o = g * width
        byte = o >> 3
        acc = 0
        for q in range(((o & 7) + width + 7) // 8):
            if byte + q < index.size:
                acc |= np.int64(index[byte + q]) << (8 * q)
        return (acc >> (o & 7)) & ((1 << width) - 1)

    @numba.njit(inline="always", nogil=True, boundscheck=False)
    def bad_code(code):  # pragma: no cover - compiled
        """1 if the positions in ``code`` are not strictly increasing and below m, else 0."""
        prev = -1
        bad = 0
        for j in range(n):
            p = (code >> (j * b)) & ((1 << b) - 1)
            bad |= np.int64(p <= prev) | np.int64(p >= m)
            prev = p
        return bad

    @numba.njit(inline="always", nogil=True, boundscheck=False)
    def put(values, out, g, code):  # pragma: no cover - compiled
        if word:
            acc = np.uint64(0)
            for j in range(n):
                v = np.uint64(np.int64(values[np.uint64(g * n + j)]) & elem_mask)
                acc |= v << np.uint64(((code >> (j * b)) & ((1 << b) - 1)) * elem_bits)
            out[np.uint64(g)] = acc
        else:
            base = g * m
            zero = out.dtype.type(0)
            for i in range(m):
                out[np.uint64(base + i)] = zero
            for j in range(n):  # min(): a corrupt position stays inside its group (reported below)
                out[np.uint64(base + min((code >> (j * b)) & ((1 << b) - 1), m - 1))] = values[np.uint64(g * n + j)]

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(values, index, out, bad):  # pragma: no cover - compiled
        groups = values.size // n
        units = groups // u
        chunks = (groups + _CHUNK - 1) // _CHUNK
        for c in numba.prange(chunks):
            stop = min(groups, (c + 1) * _CHUNK)
            seen = 0
            for t in range(c * units_per_chunk, min(units, (c + 1) * units_per_chunk)):
                for k in range(u):  # unrolled: byte offsets and shifts are constants
                    o = k * width
                    acc = 0
                    for q in range(((o & 7) + width + 7) // 8):
                        acc |= np.int64(index[np.uint64(t * ub + (o >> 3) + q)]) << (8 * q)
                    code = (acc >> (o & 7)) & ((1 << width) - 1)
                    seen |= bad_code(code)
                    put(values, out, t * u + k, code)
            for g in range(max(units * u, c * _CHUNK), stop):  # the last < u groups of the tensor
                code = code_at(index, g)
                seen |= bad_code(code)
                put(values, out, g, code)
            if seen:
                for g in range(c * _CHUNK, stop):
                    if bad_code(code_at(index, g)):
                        bad[c] = g
                        break

    return kernel


@functools.lru_cache(maxsize=None)
def _decompress_kernel(n: int, m: int):
    """Decompression for n * b > UNIT_MAX_CODE_BITS, one position at a time, specialised for ``n`` and ``m``."""
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
                    out[np.uint64(base + i)] = zero
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
    if m <= TABLE_MAX_M:
        elem_bits = a.dtype.itemsize * 8
        assert abs_bits == (1 << (elem_bits - 1)) - 1  # the word-at-a-time pattern assumes this mask
        words = a.view(np.uint64) if (m * elem_bits) % 64 == 0 else np.empty(0, np.uint64)
        _numba_pool.run(_compress_table_kernel(n, m, elem_bits), a, words, values.numpy(), index.numpy(), bad,
                        a.dtype.type(abs_bits), *pattern_table(n, m))
    else:
        _numba_pool.run(_compress_kernel(n, m), a, values.numpy(), index.numpy(), bad, a.dtype.type(abs_bits))
    return _first_bad(bad)


def decompress_cpu(values: torch.Tensor, index: torch.Tensor, out: torch.Tensor, n: int, m: int, b: int) -> int:
    """Fill ``out`` (integer view, 1-D) from ``values`` (integer view, 1-D) and ``index`` (uint8).

    Returns the first group whose positions are out of range or not increasing, or -1."""
    o = out.numpy()
    chunks = (o.size // m + _CHUNK - 1) // _CHUNK
    bad = np.full(chunks, -1, np.int64)
    if n * b <= UNIT_MAX_CODE_BITS:
        bits = o.dtype.itemsize * 8
        if m * bits == 64:
            o = o.view(np.uint64)
        _numba_pool.run(_decompress_unit_kernel(n, m, bits), values.numpy(), index.numpy(), o, bad)
    else:
        _numba_pool.run(_decompress_kernel(n, m), values.numpy(), index.numpy(), o, bad)
    return _first_bad(bad)
