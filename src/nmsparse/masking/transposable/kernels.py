"""The CPU path of transposable N:M masks: compiled numba kernels, parallel over tiles.

Per tile (see :mod:`nmsparse.masking.transposable` for the algorithms): ``a`` (m, m) float64
magnitudes, ``x`` (m, m) bool mask and ``P[i, k] = -a[i, k]`` where ``x[i, k]`` is False, ``+inf``
where it is True (the cost of keeping ``(i, k)``).

* :func:`_solve_tile`: the exact min-cost-flow solver (``"optimal"``);
* :func:`_greedy_tile`, :func:`_repair_tile`: Hubara's greedy and its completion by augmenting paths,
  with the half-of-optimum certificate (``"approx"``);
* :func:`_tiles_kernel`: every tile of a (B, R, C) tensor; :func:`_kernel_masks` calls it on torch's
  thread count.

All kernels live in this one file on purpose: numba's on-disk cache (``cache=True``) is invalidated
when the file of the cached function changes, not when a function it calls changes in another file.
"""

from __future__ import annotations

import torch

try:  # numba is a hard dependency; the guard keeps the torch path usable where it cannot load.
    import numba
    import numpy as np

    from nmsparse.plumbing import numba_pool as _numba_pool
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None

_CHUNK = 256  # tiles per parallel work item


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True, boundscheck=False)
    _jit_inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")  # small hot helpers

    @_jit_inline
    def _load_tile(w, b, r0, c0, m, a):  # pragma: no cover - compiled
        """a[:, :] = |w[b, r0:r0+m, c0:c0+m]| in float64, non-finite entries -> 2*m*m*(F+1)."""
        bad = False
        top = 0.0
        for i in range(m):
            for j in range(m):
                v = abs(np.float64(w[b, r0 + i, c0 + j]))
                if v <= 1.7976931348623157e308:
                    a[i, j] = v
                    if v > top:
                        top = v
                else:  # NaN or inf
                    a[i, j] = -1.0
                    bad = True
        if bad:
            big = (top + 1.0) * np.float64(2 * m * m)
            for i in range(m):
                for j in range(m):
                    if a[i, j] < 0.0:
                        a[i, j] = big

    @_jit_inline
    def _row_topn(a, x, P, n, m):  # pragma: no cover - compiled
        """Row-wise top-n into x (ties: rotated order i, i+1, ..., i-1 of row i); sets P."""
        for i in range(m):
            for j in range(m):
                v = a[i, j]
                rank = 0
                if j >= i:
                    for k in range(m):
                        u = a[i, k]
                        rank += (u > v) | ((u == v) & (k >= i) & (k < j))
                else:
                    for k in range(m):
                        u = a[i, k]
                        rank += (u > v) | ((u == v) & ((k >= i) | (k < j)))
                keep = rank < n
                x[i, j] = keep
                P[i, j] = np.inf if keep else -v

    @_jit
    def _solve_tile(a, x, P, n, m, cp, d, lab, done, pc, best):  # pragma: no cover - compiled
        """Exact max-|w| transposable n:m mask of tile a into x (see the package doc)."""
        _row_topn(a, x, P, n, m)
        for j in range(m):
            cnt = 0
            for i in range(m):
                cnt += x[i, j]
            d[j] = cnt
            cp[j] = 0.0
        while True:
            surplus = False
            for j in range(m):
                lab[j] = np.inf
                done[j] = False
                pc[j] = -1
                if d[j] > n:
                    surplus = True
                    lab[j] = -cp[j]
            if not surplus:
                return
            sink = -1
            dt = 0.0
            while True:  # Dijkstra over columns, from all surplus columns, to the nearest short one
                j = -1
                lj = np.inf
                for v in range(m):
                    if not done[v] and lab[v] < lj:
                        lj = lab[v]
                        j = v
                if j < 0:  # unreachable for valid input: a balanced mask always exists
                    return
                done[j] = True
                if d[j] < n:
                    sink = j
                    dt = lj
                    break
                for k in range(m):
                    best[k] = np.inf
                for i in range(m):
                    base = a[i, j] if x[i, j] else np.inf
                    for k in range(m):
                        best[k] = min(best[k], base + P[i, k])
                cpj = cp[j]
                for k in range(m):
                    if not done[k]:
                        nl = lj + (best[k] + (cpj - cp[k]))
                        if nl < lab[k]:
                            lab[k] = nl
                            pc[k] = j
            for k in range(m):
                cp[k] = cp[k] + min(lab[k], dt)
            k = sink
            for _ in range(m):
                j = pc[k]
                if j < 0:
                    break
                i = -1
                bv = np.inf
                for r in range(m):
                    if x[r, j]:
                        v = a[r, j] + P[r, k]
                        if v < bv:
                            bv = v
                            i = r
                x[i, k] = True
                P[i, k] = np.inf
                x[i, j] = False
                P[i, j] = -a[i, j]
                k = j
            d[k] -= 1
            d[sink] += 1

    @_jit
    def _sort_lines(a, order, m, by_row):  # pragma: no cover - compiled
        """order[l, :] = positions along row l (by_row) or column l of a by decreasing value, stable."""
        for l in range(m):
            for p in range(m):
                order[l, p] = p
            for p in range(1, m):
                q = order[l, p]
                v = a[l, q] if by_row else a[q, l]
                k = p - 1
                while k >= 0 and (a[l, order[l, k]] if by_row else a[order[l, k], l]) < v:
                    order[l, k + 1] = order[l, k]
                    k -= 1
                order[l, k + 1] = q

    @_jit_inline
    def _greedy_tile(a, x, n, m, order, head, hv, rc, cc, flat, idx):  # pragma: no cover - compiled
        """Hubara's greedy into x: entries by decreasing |w| (ties to the lower row-major index),
        kept while their row and column hold fewer than n. Returns the number kept (n*m: complete).

        Small tiles (m <= 8) rank all entries with branch-free counting; larger ones merge the rows'
        sorted lists (each row offers its largest unvisited entry; an offer whose column is full is
        dropped). Both visit the entries in the same order.
        """
        for i in range(m):
            rc[i] = 0
            cc[i] = 0
            for j in range(m):
                x[i, j] = False
        kept = 0
        if m <= 8:
            mm = m * m
            for i in range(m):
                for j in range(m):
                    flat[i * m + j] = a[i, j]
            for i in range(m):
                for j in range(m):
                    q = i * m + j
                    v = flat[q]
                    r = 0
                    for p in range(mm):
                        r += np.int64(flat[p] > v) + np.int64((flat[p] == v) & (p < q))
                    idx[r] = i
                    idx[mm + r] = j
            # row / column counts packed 4 bits each into registers (n < m <= 8 < 16)
            rows = np.int64(0)
            cols = np.int64(0)
            for r in range(mm):
                i = idx[r]
                j = idx[mm + r]
                ok = np.int64((((rows >> (4 * i)) & 15) < n) & (((cols >> (4 * j)) & 15) < n))
                x[i, j] = ok != 0
                rows += ok << (4 * i)
                cols += ok << (4 * j)
                kept += ok
            for i in range(m):
                rc[i] = (rows >> (4 * i)) & 15
                cc[i] = (cols >> (4 * i)) & 15
            return kept
        _sort_lines(a, order, m, True)
        for i in range(m):
            head[i] = 0
            hv[i] = a[i, order[i, 0]]
        while kept < n * m:
            bi = -1
            bv = -1.0
            for i in range(m):
                if hv[i] > bv:
                    bv = hv[i]
                    bi = i
            if bi < 0:
                break
            j = order[bi, head[bi]]
            if cc[j] < n:
                x[bi, j] = True
                kept += 1
                rc[bi] += 1
                cc[j] += 1
            head[bi] += 1
            if rc[bi] == n or head[bi] == m:
                hv[bi] = -1.0
            else:
                hv[bi] = a[bi, order[bi, head[bi]]]
        return kept

    @_jit_inline
    def _bfs_layer(sf, sg, dv, df, dg, dp, x, a, m, kept, sign):  # pragma: no cover - compiled
        """One layer of the augmenting-path search of :func:`_repair_tile`, from the source frontier
        ``sf`` (gains ``sg``) to the unvisited destinations (``dv`` False) along the entries with
        ``x[s, d] == kept``, each gaining ``sign * a[s, d]``: sets the destination frontier ``df``, the
        best gains ``dg`` and predecessors ``dp`` (first source on ties). Rows to columns use ``x, a``;
        columns to rows their transposes. True when a destination was reached."""
        reached = False
        for d in range(m):
            df[d] = False
            if dv[d]:
                continue
            bg = -np.inf
            bp = -1
            for s in range(m):
                if sf[s] and x[s, d] == kept:
                    g = sg[s] + sign * a[s, d]
                    if bp < 0 or g > bg:
                        bg = g
                        bp = s
            if bp >= 0:
                dg[d] = bg
                dp[d] = bp
                df[d] = True
                reached = True
        return reached

    @_jit
    def _repair_tile(a, x, n, m, order, order2, rc, cc, rg, cg, rpr, cpr, fr, fc, rv, cv):  # pragma: no cover
        """Complete a greedy tile by augmenting paths. True when the result provably keeps at least
        half the optimum: it keeps at least what the greedy kept (the greedy alone keeps >= half of the
        best mask with at most n per row and column, hence of the optimum), or at least half of the
        smaller of the row-wise and column-wise top-n sums (each an upper bound on the optimum)."""
        short = 0
        greedy = 0.0
        for i in range(m):
            short += n - rc[i]
            for j in range(m):
                if x[i, j]:
                    greedy += a[i, j]
        ninf = -np.inf
        for _ in range(short):
            for i in range(m):
                fr[i] = rc[i] < n
                rv[i] = fr[i]
                rg[i] = 0.0 if fr[i] else ninf
                rpr[i] = -1
                cv[i] = False
                cg[i] = ninf
                cpr[i] = -1
            chosen = -1
            for _layer in range(m):
                # frontier rows -> unvisited columns, along entries not kept
                if not _bfs_layer(fr, rg, cv, fc, cg, cpr, x, a, m, False, 1.0):
                    return False
                bg = ninf
                for k in range(m):
                    if fc[k] and cc[k] < n and (chosen < 0 or cg[k] > bg):
                        bg = cg[k]
                        chosen = k
                if chosen >= 0:
                    break
                for k in range(m):
                    cv[k] = cv[k] | fc[k]
                # new columns -> unvisited rows, along kept entries
                if not _bfs_layer(fc, cg, rv, fr, rg, rpr, x.T, a.T, m, True, -1.0):
                    return False
                for i in range(m):
                    rv[i] = rv[i] | fr[i]
            if chosen < 0:
                return False
            k = chosen
            for _step in range(m):
                i = cpr[k]
                x[i, k] = True
                j = rpr[i]
                if j < 0:
                    rc[i] += 1
                    break
                x[i, j] = False
                k = j
            cc[chosen] += 1
        kept = 0.0
        for i in range(m):
            for j in range(m):
                if x[i, j]:
                    kept += a[i, j]
        if kept >= greedy:
            return True
        _sort_lines(a, order, m, True)
        _sort_lines(a, order2, m, False)
        for l in range(m):  # top-n sums of each row and column, added in decreasing order
            rg[l] = 0.0
            cg[l] = 0.0
            for p in range(n):
                rg[l] += a[l, order[l, p]]
                cg[l] += a[order2[l, p], l]
        ubr = 0.0
        ubc = 0.0
        for i in range(m):
            ubr += rg[i]
            ubc += cg[i]
        return kept + kept >= min(ubr, ubc)

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _tiles_kernel(w, out, n, m, greedy, stats):  # pragma: no cover - compiled
        """Transposable mask of every aligned m x m tile of each matrix w[b] (B, R, C) into out.

        stats[c] = (tiles the greedy left short, tiles solved exactly after a failed repair) of chunk c.
        """
        nb, nr, nc = w.shape
        tc = nc // m
        per = (nr // m) * tc
        total = nb * per
        chunks = (total + _CHUNK - 1) // _CHUNK
        for c in numba.prange(chunks):
            a = np.empty((m, m), np.float64)
            x = np.zeros((m, m), np.bool_)
            P = np.empty((m, m), np.float64)
            cp = np.empty(m, np.float64)
            d = np.empty(m, np.int64)
            lab = np.empty(m, np.float64)
            done = np.empty(m, np.bool_)
            pc = np.empty(m, np.int64)
            best = np.empty(m, np.float64)
            order = np.empty((m, m), np.int64)
            order2 = np.empty((m, m), np.int64)
            head = np.empty(m, np.int64)
            hv = np.empty(m, np.float64)
            flat = np.empty(m * m, np.float64)
            idx = np.empty(2 * m * m, np.int64)
            rc = np.empty(m, np.int64)
            cc = np.empty(m, np.int64)
            rg = np.empty(m, np.float64)
            cg = np.empty(m, np.float64)
            rpr = np.empty(m, np.int64)
            cpr = np.empty(m, np.int64)
            fr = np.empty(m, np.bool_)
            fc = np.empty(m, np.bool_)
            rv = np.empty(m, np.bool_)
            cv = np.empty(m, np.bool_)
            short = 0
            exact = 0
            stop = min(total, (c + 1) * _CHUNK)
            for t in range(c * _CHUNK, stop):
                b = t // per
                r = t - b * per
                r0 = (r // tc) * m
                c0 = (r % tc) * m
                _load_tile(w, b, r0, c0, m, a)
                if greedy:
                    if _greedy_tile(a, x, n, m, order, head, hv, rc, cc, flat, idx) < n * m:
                        short += 1
                        if not _repair_tile(a, x, n, m, order, order2, rc, cc, rg, cg, rpr, cpr, fr, fc, rv, cv):
                            exact += 1
                            _solve_tile(a, x, P, n, m, cp, d, lab, done, pc, best)
                else:
                    _solve_tile(a, x, P, n, m, cp, d, lab, done, pc, best)
                for i in range(m):
                    for j in range(m):
                        out[b, r0 + i, c0 + j] = x[i, j]
            stats[c, 0] = short
            stats[c, 1] = exact


def _kernel_masks(w: torch.Tensor, n: int, m: int, greedy: bool) -> tuple[torch.Tensor, int, int]:
    """numba path: ``w`` is (B, R, C) on CPU. Returns (mask, short tiles, exactly re-solved tiles)."""
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()  # float16 / bfloat16 -> float32 is exact
    w = w.contiguous()
    out = torch.empty(w.shape, dtype=torch.bool)
    tiles = w.shape[0] * (w.shape[1] // m) * (w.shape[2] // m)
    stats = np.zeros((max(1, (tiles + _CHUNK - 1) // _CHUNK), 2), dtype=np.int64)
    _numba_pool.run(_tiles_kernel, w.numpy(), out.numpy(), n, m, greedy, stats)  # torch's thread count
    short, exact = stats.sum(0).tolist()
    return out, short, exact
