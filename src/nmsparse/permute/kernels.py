"""Compiled inner loops of the channel-permutation search (numba). Private: call them through
:mod:`nmsparse.permute.search`.

Every kernel reads the importance matrix column-major, ``st[c, r]`` = importance of channel ``c`` in
row ``r`` (rows: output channels, times kernel positions for a convolution, times every layer tied
to the same permutation). The value of a group of channels is ``sum_r (sum of the n largest
st[c, r] over the group's channels c)``: what an N:M mask keeps of those rows.
"""

from __future__ import annotations

import numba
import numpy as np

PARALLEL_WORK = 1 << 26  # pair-split-row evaluations from which the first refresh runs in parallel

@numba.njit(cache=True, nogil=True, boundscheck=False)
def _topn(buf, m, n):  # pragma: no cover - compiled
    """Sum of the n largest of buf[:m]: branch-free for m = 4, else an insertion sort (descending)."""
    if m == 4:
        a, b, c, d = buf[0], buf[1], buf[2], buf[3]
        hi1, lo1 = max(a, b), min(a, b)
        hi2, lo2 = max(c, d), min(c, d)
        top = max(hi1, hi2)
        if n == 1:
            return top
        if n == 2:
            return top + max(min(hi1, hi2), max(lo1, lo2))
        if n == 3:
            return a + b + c + d - min(lo1, lo2)
    for i in range(1, m):
        v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] < v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = v
    s = 0.0
    for i in range(n):
        s += buf[i]
    return s


@numba.njit(cache=True, nogil=True, boundscheck=False)
def group_value(st, cols, n):  # pragma: no cover - compiled
    """Kept importance of one group of channels ``cols`` over every row."""
    m = cols.size
    buf = np.empty(m, np.float64)
    total = 0.0
    for r in range(st.shape[1]):
        for k in range(m):
            buf[k] = st[cols[k], r]
        total += _topn(buf, m, n)
    return total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def subset_values(st, subsets, n):  # pragma: no cover - compiled
    """``group_value`` of every row of ``subsets`` (K, m)."""
    out = np.empty(subsets.shape[0], np.float64)
    for k in range(subsets.shape[0]):
        out[k] = group_value(st, subsets[k], n)
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def exact_partition(vals, masks, start, c):  # pragma: no cover - compiled
    """Best partition of ``c`` channels into groups (dynamic programming over subsets).

    ``masks[k]`` is the bitmask of candidate group k, ``vals[k]`` its value; candidates are sorted by
    their lowest channel, those whose lowest channel is b are ``start[b]:start[b+1]``. Every partition
    is reached exactly once by always completing the lowest free channel first. Returns the chosen
    candidate indices (c/m of them) and the optimum.
    """
    full = (1 << c) - 1
    f = np.full(1 << c, -np.inf)
    choice = np.full(1 << c, -1, np.int64)
    f[0] = 0.0
    for mask in range(full):
        fm = f[mask]
        if fm == -np.inf:
            continue
        b = 0
        while (mask >> b) & 1:
            b += 1
        for k in range(start[b], start[b + 1]):
            sm = masks[k]
            if sm & mask:
                continue
            nm = mask | sm
            v = fm + vals[k]
            if v > f[nm]:
                f[nm] = v
                choice[nm] = k
    picks = []
    mask = full
    while mask:
        k = choice[mask]
        picks.append(k)
        mask ^= masks[k]
    return np.array(picks, np.int64), f[full]


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def _quad(a, b, c, d, w2, w3):  # pragma: no cover - compiled
    """Sum of the n largest of four values, branch-free (w2 = n >= 2, w3 = n >= 3 as 0/1)."""
    hi1, lo1 = max(a, b), min(a, b)
    hi2, lo2 = max(c, d), min(c, d)
    mid_hi, mid_lo = min(hi1, hi2), max(lo1, lo2)
    return max(hi1, hi2) + w2 * max(mid_hi, mid_lo) + w3 * min(mid_hi, mid_lo)


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def _pair_best4(st, cols, n, split_a, split_b):  # pragma: no cover - compiled
    """:func:`_pair_best` for m = 4: one split at a time over contiguous rows (SIMD-friendly)."""
    w2 = 1.0 if n >= 2 else 0.0
    w3 = 1.0 if n >= 3 else 0.0
    ns = split_a.shape[0]
    best, best_s, base = -np.inf, 0, 0.0
    for s in range(ns):
        a0, a1, a2, a3 = st[cols[split_a[s, 0]]], st[cols[split_a[s, 1]]], st[cols[split_a[s, 2]]], st[cols[split_a[s, 3]]]
        b0, b1, b2, b3 = st[cols[split_b[s, 0]]], st[cols[split_b[s, 1]]], st[cols[split_b[s, 2]]], st[cols[split_b[s, 3]]]
        acc = 0.0
        for r in range(st.shape[1]):
            acc += _quad(a0[r], a1[r], a2[r], a3[r], w2, w3) + _quad(b0[r], b1[r], b2[r], b3[r], w2, w3)
        if s == 0:
            base = acc
        if acc > best:
            best, best_s = acc, s
    return best - base, best_s


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pair_best(st, groups, i, j, n, split_a, split_b):  # pragma: no cover - compiled
    """Best re-split of the 2m channels of groups i and j among the candidate splits.

    ``split_a[s]`` / ``split_b[s]`` are positions (0..2m-1, group i's channels first) forming the two
    new groups; split 0 is the current one. Returns (gain over split 0, best split index).
    """
    m = groups.shape[1]
    cols = np.empty(2 * m, np.int64)
    for k in range(m):
        cols[k] = groups[i, k]
        cols[m + k] = groups[j, k]
    if m == 4:
        return _pair_best4(st, cols, n, split_a, split_b)
    if m > 4:
        return _pair_best_swaps(st, cols, m, n)
    return _pair_best_splits(st, cols, m, n, split_a, split_b)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pair_best_swaps(st, cols, m, n):  # pragma: no cover - compiled
    """Best single swap between two groups of m (cols[:m], cols[m:]), split order of ``_splits``:
    index 0 = no swap, 1 + i * m + j = swap position i of the first with position j of the second.

    Per row, with T the group's top-n sum, v_n / v_n1 its n-th / (n+1)-th largest, a channel c
    of value s_c leaving and b entering give T - x_c + max(y_c, b), where (x_c, y_c) = (s_c, v_n1) if
    c is among the top n (ties to the lower position) and (v_n, v_n) otherwise: O(1) per swap.
    """
    acc = np.zeros(1 + m * m, np.float64)
    row = np.empty(2 * m, np.float64)
    x = np.empty(2 * m, np.float64)
    y = np.empty(2 * m, np.float64)
    srt = np.empty(m, np.float64)
    for r in range(st.shape[1]):
        for k in range(2 * m):
            row[k] = st[cols[k], r]
        for g in range(2):
            base = g * m
            for k in range(m):
                srt[k] = row[base + k]
            srt.sort()  # ascending: n-th largest is srt[m - n], (n+1)-th is srt[m - n - 1]
            vn, vn1 = srt[m - n], srt[m - n - 1]
            for k in range(m):
                v = row[base + k]
                rank = 0
                for q in range(m):
                    w = row[base + q]
                    if w > v or (w == v and q < k):
                        rank += 1
                if rank < n:
                    x[base + k], y[base + k] = v, vn1
                else:
                    x[base + k], y[base + k] = vn, vn
        for i in range(m):
            for j in range(m):
                b = m + j
                acc[1 + i * m + j] += max(y[i], row[b]) - x[i] + max(y[b], row[i]) - x[b]
    best = 0
    for s in range(1, 1 + m * m):
        if acc[s] > acc[best]:
            best = s
    return acc[best], best


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pair_best_splits(st, cols, m, n, split_a, split_b):  # pragma: no cover - compiled
    """Generic evaluation of every split (reference; the search uses the faster kernels above)."""
    ns = split_a.shape[0]
    acc = np.zeros(ns, np.float64)
    row = np.empty(2 * m, np.float64)
    buf = np.empty(m, np.float64)
    for r in range(st.shape[1]):
        for k in range(2 * m):
            row[k] = st[cols[k], r]
        for s in range(ns):
            for k in range(m):
                buf[k] = row[split_a[s, k]]
            v = _topn(buf, m, n)
            for k in range(m):
                buf[k] = row[split_b[s, k]]
            acc[s] += v + _topn(buf, m, n)
    best = 0
    for s in range(1, ns):
        if acc[s] > acc[best]:
            best = s
    return acc[best] - acc[0], best


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _refresh_pair(st, groups, n, split_a, split_b, gain, which, rows, t):  # pragma: no cover - compiled
    """Work item ``t`` of a refresh: the pair (``rows[t // g]``, ``t % g``), g groups; nothing on the diagonal."""
    g = groups.shape[0]
    i = rows[t // g]
    j = t % g
    if i == j:
        return
    a, b = (i, j) if i < j else (j, i)
    gn, s = _pair_best(st, groups, a, b, n, split_a, split_b)
    gain[a, b] = gn
    which[a, b] = s


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def refresh_parallel(st, groups, n, split_a, split_b, gain, which, rows):  # pragma: no cover - compiled
    """Recompute the cached best move of every pair that involves a group listed in ``rows``
    (all pairs when ``rows`` lists every group)."""
    for t in numba.prange(rows.size * groups.shape[0]):
        _refresh_pair(st, groups, n, split_a, split_b, gain, which, rows, t)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _refresh(st, groups, n, split_a, split_b, gain, which, rows):  # pragma: no cover - compiled
    """:func:`refresh_parallel` on one thread."""
    for t in range(rows.size * groups.shape[0]):
        _refresh_pair(st, groups, n, split_a, split_b, gain, which, rows, t)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _apply_split(groups, i, j, split_a, split_b, s):  # pragma: no cover - compiled
    m = groups.shape[1]
    cols = np.empty(2 * m, np.int64)
    for k in range(m):
        cols[k] = groups[i, k]
        cols[m + k] = groups[j, k]
    for k in range(m):
        groups[i, k] = cols[split_a[s, k]]
        groups[j, k] = cols[split_b[s, k]]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def local_search(st, groups, n, split_a, split_b, gain, which, escapes, seed, tol, max_moves):  # pragma: no cover
    """Steepest-ascent pair moves from ``groups`` (G, m), with ``escapes`` random perturbations.

    ``gain`` / ``which`` (G, G): the best move of every pair i < j, precomputed by
    :func:`refresh_all` (in parallel for large problems); later updates run on one thread.

    Each step applies the best re-split of any pair of groups (cached per pair; after a move only
    the pairs touching the two changed groups are recomputed). At a local optimum the best partition
    so far is saved, then an escape swaps a random channel between two random groups, one to three
    times (accepting a loss), and the ascent continues. Returns (best groups, best value relative to the start, moves).
    The start is a candidate, so the result is never worse than it.
    """
    np.random.seed(seed)
    g = groups.shape[0]
    best = groups.copy()
    cur = 0.0
    best_val = 0.0
    moves = 0
    left = escapes
    pair = np.empty(2, np.int64)
    m = groups.shape[1]
    while moves < max_moves:
        bi, bj, bg = -1, -1, tol
        for a in range(g):
            for b in range(a + 1, g):
                if gain[a, b] > bg:
                    bg = gain[a, b]
                    bi, bj = a, b
        if bi >= 0:
            _apply_split(groups, bi, bj, split_a, split_b, which[bi, bj])
            cur += bg
            moves += 1
        else:
            if cur > best_val + tol:
                best_val = cur
                best[:, :] = groups
            if left == 0:
                break
            left -= 1
            for _ in range(1 + left % 3):  # kicks of 1, 2 or 3 random swaps, in turn
                bi = np.random.randint(g)
                bj = np.random.randint(g - 1)
                if bj >= bi:
                    bj += 1
                pa, pb = np.random.randint(m), np.random.randint(m)
                before = group_value(st, groups[bi], n) + group_value(st, groups[bj], n)
                groups[bi, pa], groups[bj, pb] = groups[bj, pb], groups[bi, pa]
                cur += group_value(st, groups[bi], n) + group_value(st, groups[bj], n) - before
                pair[0], pair[1] = bi, bj
                _refresh(st, groups, n, split_a, split_b, gain, which, pair)
            continue
        pair[0], pair[1] = bi, bj
        _refresh(st, groups, n, split_a, split_b, gain, which, pair)
    if cur > best_val + tol:
        best_val = cur
        best[:, :] = groups
    return best, best_val, moves


@numba.njit(cache=True, nogil=True, boundscheck=False)
def refresh_all(st, groups, n, split_a, split_b, gain, which):  # pragma: no cover - compiled
    """Best move of every pair of groups, on one thread."""
    _refresh(st, groups, n, split_a, split_b, gain, which, np.arange(groups.shape[0]))
