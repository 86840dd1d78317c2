"""Transposable N:M masks (Hubara et al., NeurIPS 2021).

A weight ``W`` of shape ``(out, in)`` with an N:M mask along ``in`` speeds up the forward matmul; the
backward matmul that sends the error to the layer's input uses ``W^T``, which is N:M along ``out`` only
when the mask is *transposable*: in every aligned ``m x m`` tile ``W[i:i+m, j:j+m]`` every row and every
column keeps exactly ``n`` entries (N = weights **kept** per group of M, as everywhere in nmsparse).

Tiles are true aligned 2-D blocks of the ``(out, in)`` matrix. (The authors' code reshapes ``m*m``
consecutive weights of one output row into a square instead, which does not constrain ``W^T`` at all.)

Two methods; both return exactly ``n`` kept entries in every row and every column of every tile.

``"optimal"``
    The largest possible kept ``sum |w|`` per tile: the min-cost flow of the paper (rows -> columns,
    capacities ``n``, edge costs ``-|w|``), solved exactly by successive shortest paths:

    1. Start from the row-wise top-``n`` mask (ties broken in the rotated column order
       ``i, i+1, ..., i-1`` of row ``i``, so a constant tile is already balanced). It is optimal when only
       the rows are constrained, so its residual graph has no negative cycle.
    2. Move the surplus of over-full columns to under-full ones, one unit at a time, along shortest
       residual paths. A residual path alternates ``column j -> row i`` (drop kept ``(i, j)``) and
       ``row i -> column k`` (keep ``(i, k)``); the solver runs Dijkstra on the ``m`` columns with these
       two-step edges, of cost ``|w_ij| - |w_ik|``, made non-negative by column potentials. Only the
       surplus moves: about 1.5 (2:4), 4.3 (4:8) and 12.7 (8:16) augmentations per random tile.

    The kept total equals the linear-programming optimum up to float64 rounding of the path lengths
    (exactly, when the sums are exact, e.g. small integers). Ties between optimal masks are broken by
    the deterministic order of the steps above.
``"approx"``
    The paper's 2-approximation: per tile, visit entries by decreasing ``|w|`` (ties to the lower
    row-major index) and keep one while its row and its column hold fewer than ``n``. The greedy can
    strand rows below ``n`` (16% of random 4x4 tiles at 2:4, 55% of 8x8 at 4:8); those tiles are completed
    by augmenting paths (the shortest alternating paths from a short row to a short column, of largest
    kept-``|w|`` gain). A completed tile is accepted with a certificate of the 1/2 bound: it keeps at
    least what the greedy kept (the greedy keeps at least half of the best mask with at most ``n`` per
    row and column, the classic bound of greedy matching, hence of the optimum), or at least half of an
    upper bound on the optimum (the smaller of the row-wise and column-wise top-``n`` sums); otherwise
    the tile is solved exactly (this never happened on random matrices). So every row and column keeps
    exactly ``n``, and every tile keeps at least half of its optimum.

Magnitudes are compared and summed in float64. ``NaN`` and ``inf`` count as larger than every finite
magnitude (as in :func:`nmsparse.nm_mask`): in a tile holding any, they are given the value
``2*m*m*(F+1)`` with ``F`` the tile's largest finite ``|w|``, so as many of them as possible are kept.

CPU tensors run in compiled numba kernels (parallel over tiles); other devices (CUDA) run a vectorised
torch version of the same algorithms, with the same float operations in the same order and the same
tie-breaking, so both give identical masks. Exception: ``"optimal"`` 2:4 on CUDA scores each tile's 90
transposable patterns in one batched matmul (:func:`_optimal_24`): the same optimum, no host round
trip; on exact ties between optimal masks it may pick another one than the CPU.
"""

from __future__ import annotations

import torch

from nmsparse.masking.layout import matrices_of, unmatrices
from nmsparse.masking.nm import _BITS, check_nm, is_nm

try:  # numba is a hard dependency; the guard keeps the torch path usable where it cannot load.
    import numba
    import numpy as np

    from nmsparse.plumbing import numba_pool as _numba_pool
except ImportError:  # pragma: no cover - exercised only on broken installs
    numba = None

METHODS = ("optimal", "approx")
_CHUNK = 256  # tiles per parallel work item
_FORCE_TORCH = False  # tests flip this to run the torch path on CPU
_AS_CUDA = False  # tests flip this to run on CPU exactly the route a CUDA tensor takes
_INF = float("inf")


def check_method(method: object) -> str:
    """Validate a transposable-mask method name ("optimal" or "approx")."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# numba kernels (CPU). Per tile: a (m, m) float64 magnitudes, x (m, m) bool mask, and
# P[i, k] = -a[i, k] where x[i, k] is False, +inf where it is True (the cost of keeping (i, k)).
# --------------------------------------------------------------------------------------------------

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
        """Exact max-|w| transposable n:m mask of tile a into x (see the module doc)."""
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


# --------------------------------------------------------------------------------------------------
# torch path (CUDA, or CPU without numba): the same algorithms vectorised over tiles, with the same
# float operations in the same order and the same tie-breaking (first index of a min / max).
# --------------------------------------------------------------------------------------------------


def _tiles_of(w: torch.Tensor, m: int) -> torch.Tensor:
    """(B, R, C) -> (B * R/m * C/m, m, m) float64 magnitudes, tiles in row-major order per matrix."""
    nb, nr, nc = w.shape
    a = w.detach().abs().to(torch.float64)
    a = a.reshape(nb, nr // m, m, nc // m, m).permute(0, 1, 3, 2, 4).reshape(-1, m, m)
    bad = ~torch.isfinite(a)  # no host test of bad.any(): that would wait for the GPU
    top = a.masked_fill(bad, 0.0).flatten(1).amax(1)
    big = (top + 1.0) * float(2 * m * m)
    return torch.where(bad, big[:, None, None], a)


def _untile(x: torch.Tensor, shape: torch.Size, m: int) -> torch.Tensor:
    nb, nr, nc = shape
    return x.reshape(nb, nr // m, nc // m, m, m).permute(0, 1, 3, 2, 4).reshape(nb, nr, nc)


def _row_topn_torch(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    dev = a.device
    rot = (torch.arange(m, device=dev)[:, None] + torch.arange(m, device=dev)[None, :]) % m  # [i, k] -> j
    rot_b = rot.expand(a.shape[0], m, m)
    order = torch.sort(torch.gather(a, 2, rot_b), dim=2, descending=True, stable=True).indices
    x = torch.zeros(a.shape, dtype=torch.bool, device=dev)
    return x.scatter_(2, torch.gather(rot_b, 2, order[:, :, :n]), True)


def _solve_torch(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Exact transposable masks of tiles ``a`` (T, m, m) float64; mirrors ``_solve_tile``."""
    dev = a.device
    x = _row_topn_torch(a, n, m)
    P = torch.where(x, _INF, -a)
    cp = torch.zeros(a.shape[0], m, dtype=torch.float64, device=dev)
    d = x.sum(1)
    while True:
        act = (d > n).any(1).nonzero().squeeze(1)
        if act.numel() == 0:
            return x
        A, X, Pa, CP, D = a[act], x[act], P[act], cp[act], d[act]
        nb = act.numel()
        rows = torch.arange(nb, device=dev)
        lab = torch.where(D > n, -CP, _INF)
        done = torch.zeros(nb, m, dtype=torch.bool, device=dev)
        pc = torch.full((nb, m), -1, dtype=torch.long, device=dev)
        live = torch.ones(nb, dtype=torch.bool, device=dev)
        sink = torch.zeros(nb, dtype=torch.long, device=dev)
        dt = torch.zeros(nb, dtype=torch.float64, device=dev)
        for _ in range(m):
            lv = lab.masked_fill(done, _INF)
            j = lv.argmin(1)
            lj = lv[rows, j]
            done[rows, j] |= live
            hit = live & (D[rows, j] < n)
            sink = torch.where(hit, j, sink)
            dt = torch.where(hit, lj, dt)
            live = live & ~hit
            if not bool(live.any()):
                break
            base = torch.where(X[rows, :, j], A[rows, :, j], _INF)  # over rows i
            best = (base[:, :, None] + Pa).amin(1)  # over columns k
            nl = lj[:, None] + (best + (CP[rows, j][:, None] - CP))
            ok = live[:, None] & ~done & (nl < lab)
            lab = torch.where(ok, nl, lab)
            pc = torch.where(ok, j[:, None], pc)
        CP = CP + torch.minimum(lab, dt[:, None])
        k = sink.clone()
        going = torch.ones(nb, dtype=torch.bool, device=dev)
        for _ in range(m):
            j = pc[rows, k]
            going = going & (j >= 0)
            if not bool(going.any()):
                break
            jj = j.clamp(min=0)
            i = (torch.where(X[rows, :, jj], A[rows, :, jj], _INF) + Pa[rows, :, k]).argmin(1)
            g, gi, gk, gj = rows[going], i[going], k[going], jj[going]
            X[g, gi, gk] = True
            Pa[g, gi, gk] = _INF
            X[g, gi, gj] = False
            Pa[g, gi, gj] = -A[g, gi, gj]
            k = torch.where(going, jj, k)
        D[rows, k] -= 1
        D[rows, sink] += 1
        x[act], P[act], cp[act], d[act] = X, Pa, CP, D


def _greedy_torch(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Hubara's greedy on tiles ``a`` (T, m, m), by a stable sort of each tile; gives the same masks as
    the row-merging ``_greedy_tile`` (both visit entries by decreasing value, ties row-major)."""
    t_count = a.shape[0]
    dev = a.device
    order = torch.sort(a.reshape(t_count, m * m), dim=1, descending=True, stable=True).indices
    x = torch.zeros(t_count, m * m, dtype=torch.bool, device=dev)
    rc = torch.zeros(t_count, m, dtype=torch.long, device=dev)
    cc = torch.zeros(t_count, m, dtype=torch.long, device=dev)
    rows = torch.arange(t_count, device=dev)
    for p in range(m * m):
        q = order[:, p]
        i, j = q // m, q % m
        ok = (rc[rows, i] < n) & (cc[rows, j] < n)
        x[rows, q] = ok
        rc[rows, i] += ok
        cc[rows, j] += ok
    return x.view(t_count, m, m)


def _augment_torch(A, X, RC, CC, live, n: int, m: int, syncs: bool) -> torch.Tensor:
    """One augmenting path (a short row to a short column, of largest kept-``|w|`` gain) in every tile
    where ``live`` (bool (T,)), in place on ``X`` (T, m, m), ``RC`` (T, m) and ``CC`` (T, m); other
    tiles are untouched. Returns ``ok`` (T,): False where the search got stuck. With ``syncs`` the
    loops stop as soon as no tile is left (a host read per layer); without, they run their ``m``
    layers and ``m`` path steps with the finished tiles masked out: the same result, no host read."""
    dev = A.device
    nb = A.shape[0]
    ninf = -_INF
    rows = torch.arange(nb, device=dev)
    start_live = live
    fr = live[:, None] & (RC < n)
    rv = fr.clone()
    rg = torch.where(fr, 0.0, ninf).to(torch.float64)
    rpr = torch.full((nb, m), -1, dtype=torch.long, device=dev)
    cv = torch.zeros(nb, m, dtype=torch.bool, device=dev)
    cg = torch.full((nb, m), ninf, dtype=torch.float64, device=dev)
    cpr = torch.full((nb, m), -1, dtype=torch.long, device=dev)
    ok = torch.ones(nb, dtype=torch.bool, device=dev)
    chosen = torch.zeros(nb, dtype=torch.long, device=dev)
    for _ in range(m):
        edge = fr[:, :, None] & ~X  # [t, i, k]
        bg, bp = torch.where(edge, rg[:, :, None] + A, ninf).max(1)
        # first i among the candidates with the largest gain (a -inf gain still counts as found)
        bp = torch.where(edge.any(1), _first_arg(edge, bg[:, None, :], rg[:, :, None] + A, 1), bp)
        fc = live[:, None] & ~cv & edge.any(1)
        cg = torch.where(fc, bg, cg)
        cpr = torch.where(fc, bp, cpr)
        short_c = fc & (CC < n)
        has = short_c.any(1)
        pick = _first_arg(short_c, torch.where(short_c, cg, ninf).amax(1, keepdim=True), cg, 1)
        chosen = torch.where(live & has, pick, chosen)
        stuck = live & ~has & ~fc.any(1)
        ok &= ~stuck
        live = live & ~has & ~stuck
        if syncs and not bool(live.any()):
            break
        cv |= fc
        edge = fc[:, None, :] & X  # [t, i, k]
        val = cg[:, None, :] - A
        bg, _ = torch.where(edge, val, ninf).max(2)
        bp = _first_arg(edge, bg[:, :, None], val, 2)
        fr = live[:, None] & ~rv & edge.any(2)
        rg = torch.where(fr, bg, rg)
        rpr = torch.where(fr, bp, rpr)
        rv |= fr
        stuck = live & ~fr.any(1)
        ok &= ~stuck
        live = live & ~stuck
    ok &= ~live  # no short column within m layers (cannot happen: a balanced mask exists)
    done = ok & start_live
    k = chosen.clone()
    going = done.clone()
    for _ in range(m):  # walk the path back from the short column: keep (i, k), drop (i, j)
        if syncs and not bool(going.any()):
            break
        i = cpr[rows, k].clamp(min=0)
        X[rows, i, k] = X[rows, i, k] | going
        j = rpr[rows, i]
        RC[rows, i] += (going & (j < 0)).long()
        going = going & (j >= 0)
        jj = j.clamp(min=0)
        X[rows, i, jj] = X[rows, i, jj] & ~going
        k = torch.where(going, jj, k)
    CC[rows, chosen] += done.long()
    return ok


def _repair_torch(a: torch.Tensor, x: torch.Tensor, n: int, m: int, rounds: int | None = None) -> torch.Tensor:
    """Complete greedy tiles by augmenting paths in place; mirrors ``_repair_tile``.

    Returns a bool (T,) telling which tiles passed its certificate (at least half the optimum).
    ``rounds=None``: each round gathers the tiles still short (a host read) and augments those.
    ``rounds=R``: R rounds over every tile, the complete ones masked out, with no host read; a tile
    still short after them fails the certificate. ``R = (n - 1) ** 2`` always suffices: a greedy
    tile with a short row has a column that is not full either; every entry between a short row and
    a column that is not full was kept, so at most ``n - 1`` rows are short, each by at most ``n - 1``
    (the short rows keep at least one entry each). Both give the same masks."""
    dev = a.device
    nt = a.shape[0]
    greedy = _kept_sum(a, x, m)
    rc, cc = x.sum(2), x.sum(1)
    good = torch.ones(nt, dtype=torch.bool, device=dev)
    if rounds is None:
        while True:
            act = (good & (rc < n).any(1)).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            X, RC, CC = x[act], rc[act], cc[act]
            ok = _augment_torch(a[act], X, RC, CC, torch.ones(act.numel(), dtype=torch.bool, device=dev), n, m, True)
            x[act], rc[act], cc[act] = X, RC, CC
            good[act] = ok
    else:
        for _ in range(rounds):
            good = good & _augment_torch(a, x, rc, cc, good & (rc < n).any(1), n, m, False)
        good = good & ~(rc < n).any(1)
    kept = _kept_sum(a, x, m)
    rs = torch.sort(a, dim=2, descending=True, stable=True).values  # rows, decreasing
    cs = torch.sort(a, dim=1, descending=True, stable=True).values  # columns, decreasing
    rg = torch.zeros(nt, m, dtype=torch.float64, device=dev)
    cg = torch.zeros(nt, m, dtype=torch.float64, device=dev)
    for p in range(n):
        rg = rg + rs[:, :, p]
        cg = cg + cs[:, p, :]
    ubr = torch.zeros(nt, dtype=torch.float64, device=dev)
    ubc = torch.zeros(nt, dtype=torch.float64, device=dev)
    for i in range(m):
        ubr = ubr + rg[:, i]
        ubc = ubc + cg[:, i]
    return good & ((kept >= greedy) | (kept + kept >= torch.minimum(ubr, ubc)))


def _kept_sum(a: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """Kept sum of each tile, added in row-major order like the kernel."""
    kept = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for i in range(m):
        for j in range(m):
            kept = kept + torch.where(x[:, i, j], a[:, i, j], 0.0)
    return kept


def _first_arg(cand: torch.Tensor, target: torch.Tensor, val: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of the first position along ``dim`` where ``cand`` holds and ``val == target``."""
    hit = cand & (val == target)
    size = cand.shape[dim]
    shape = [1] * cand.dim()
    shape[dim] = size
    pos = torch.arange(size, device=cand.device).view(shape)
    return torch.where(hit, pos, size).amin(dim)


_FIXED_ROUNDS_MAX = 4  # repair in (n-1)**2 <= this many rounds over every tile, without host reads (n <= 3)


def _torch_masks(w: torch.Tensor, n: int, m: int, greedy: bool) -> tuple[torch.Tensor, int, int]:
    a = _tiles_of(w, m)
    short = exact = 0
    if greedy and (n - 1) ** 2 <= _FIXED_ROUNDS_MAX:
        # greedy and repair run without a host read; one read at the end (the two counts) decides
        # whether a tile failed its certificate and needs the exact solver (never seen on random data)
        x = _greedy_torch(a, n, m)
        under = x.flatten(1).sum(1) < n * m
        bad = under & ~_repair_torch(a, x, n, m, rounds=(n - 1) ** 2)
        short, exact = torch.stack([under.sum(), bad.sum()]).tolist()
        if exact:
            idx = bad.nonzero().squeeze(1)
            x[idx] = _solve_torch(a[idx], n, m)
    elif greedy:
        x = _greedy_torch(a, n, m)
        under = (x.flatten(1).sum(1) < n * m).nonzero().squeeze(1)
        short = int(under.numel())
        if short:
            xs = x[under]
            good = _repair_torch(a[under], xs, n, m)
            bad = (~good).nonzero().squeeze(1)
            exact = int(bad.numel())
            if exact:
                xs[bad] = _solve_torch(a[under][bad], n, m)
            x[under] = xs
    else:
        x = _solve_torch(a, n, m)
    return _untile(x, w.shape, m), short, exact


def _check_matrix(w: object, m: int, what: str, batched: bool = False) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{what} needs a torch.Tensor, got {type(w).__name__}")
    want = 3 if batched else 2
    if w.dim() != want:
        raise ValueError(
            f"{what} needs a {want}-D tensor{' (matrices, rows, cols)' if batched else ' (out, in)'}, "
            f"got shape {tuple(w.shape)}" + ("" if batched else "; for a conv weight use transposable_layer_mask")
        )
    rows, cols = w.shape[-2], w.shape[-1]
    if rows % m or cols % m:
        raise ValueError(
            f"{what} needs both matrix sizes to be multiples of m={m} (aligned {m}x{m} tiles), "
            f"got {rows} x {cols}"
        )
    return w


def _masks(w: torch.Tensor, n: int, m: int, method: str) -> tuple[torch.Tensor, int, int]:
    """Masks of a (B, R, C) float tensor: (mask, tiles the greedy left short, tiles solved exactly
    after a failed repair); the two counts are 0 for ``"optimal"``."""
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device), 0, 0
    greedy = method == "approx"
    cuda = w.device.type == "cuda" or _AS_CUDA
    if w.device.type == "cpu" and numba is not None and not _FORCE_TORCH and not cuda:
        return _kernel_masks(w.detach(), n, m, greedy)
    if cuda and not greedy and (n, m) == (2, 4):
        return _optimal_24(w.detach()), 0, 0
    return _torch_masks(w.detach(), n, m, greedy)


# --------------------------------------------------------------------------------------------------
# exact 2:4 on CUDA: the best of the 90 transposable 4x4 patterns of every tile, in batched matmuls
# --------------------------------------------------------------------------------------------------


def _patterns_24() -> torch.Tensor:
    """The 90 bool 4x4 patterns with two True in every row and column, as (90, 16). The first is the
    solver's own answer for a constant tile (row i keeps columns i and i+1 mod 4), so zero and constant
    tiles get the same mask as on the CPU."""
    import itertools

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


def _check_float(w: torch.Tensor, what: str) -> None:
    if w.dtype not in _BITS:
        raise ValueError(
            f"{what} needs a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got dtype {w.dtype}; convert it first, e.g. w.float()"
        )


def transposable_mask(w: torch.Tensor, n: int, m: int, method: str = "optimal") -> torch.Tensor:
    """Transposable N:M keep-mask of a 2-D ``w`` (N kept per group of M): in every aligned
    ``m x m`` tile ``w[i:i+m, j:j+m]`` exactly ``n`` entries of each row and of each column are True,
    so both the mask and its transpose are N:M along their last dimension.

    ``method="optimal"`` keeps the largest possible total ``|w|`` (exact min-cost-flow optimum per
    tile); ``method="approx"`` is the paper's greedy 2-approximation, with tiles the greedy leaves
    under-filled completed by augmenting paths (kept ``|w|`` >= half the optimum on every tile, by a
    per-tile certificate, else an exact solve). See the module doc.

    ``w`` may have any float dtype and live on any device; both sizes must be multiples of ``m``.
    Returns a ``torch.bool`` tensor of ``w``'s shape on ``w``'s device. Raises ``ValueError`` for a
    non-2-D or non-float input, sizes that are not multiples of ``m``, a bad ``n``/``m`` or method.
    """
    n, m = check_nm(n, m)
    check_method(method)
    _check_matrix(w, m, "transposable_mask")
    _check_float(w, "transposable_mask")
    return _masks(w.unsqueeze(0), n, m, method)[0][0]


def transposable_stats(w: torch.Tensor, n: int, m: int, method: str = "approx") -> dict:
    """The mask of :func:`transposable_mask` plus diagnostics, for benchmarks and reports.

    Returns a dict: ``mask``; ``tiles``; ``short``, the tiles the greedy left with a row under ``n``
    (completed by augmenting paths; 0 for ``"optimal"``); ``exact``, the short tiles whose completion
    missed the half-of-upper-bound certificate and were solved exactly; ``kept_abs`` and ``total_abs``,
    the kept and total ``sum |w|`` (float64; non-finite entries make them non-finite).
    """
    n, m = check_nm(n, m)
    check_method(method)
    _check_matrix(w, m, "transposable_stats")
    _check_float(w, "transposable_stats")
    mask, short, exact = _masks(w.unsqueeze(0), n, m, method)
    a = w.detach().abs().double()
    return {
        "mask": mask[0],
        "tiles": (w.shape[0] // m) * (w.shape[1] // m),
        "short": short,
        "exact": exact,
        "kept_abs": float(a[mask[0]].sum()),
        "total_abs": float(a.sum()),
    }


def is_transposable_nm(t: torch.Tensor, n: int, m: int) -> bool:
    """True when every aligned ``m x m`` tile of the 2-D ``t`` holds at most ``n`` non-zeros in each
    of its rows and each of its columns, i.e. both ``t`` and ``t.T`` pass :func:`nmsparse.is_nm`.
    ``t`` may be a weight or a boolean mask (NaN counts as non-zero)."""
    n, m = check_nm(n, m)
    _check_matrix(t, m, "is_transposable_nm")
    return is_nm(t, n, m, dim=1) and is_nm(t, n, m, dim=0)


def transposable_layer_mask(
    weight: torch.Tensor, n: int, m: int, method: str = "approx", layout: str = "channels"
) -> torch.Tensor:
    """Transposable N:M keep-mask of a Linear or conv weight; same shape as ``weight``.

    Linear ``(out, in)``: the mask of the matrix. Convolutions ``(out, in/groups, *kernel)``: in
    ``layout="channels"`` each kernel position's ``(out, in/groups)`` matrix gets its own transposable
    mask (N:M along input channels for the forward, along output channels for the input gradient); in
    ``layout="flat"`` the ``(out, in/groups * prod(kernel))`` matrix does. ``out`` and the grouped
    axis must be multiples of ``m`` (for grouped convolutions, ``out/groups`` too, so that no tile
    straddles two groups; :func:`nmsparse.masking.layout.unsupported_reason` checks that).
    """
    n, m = check_nm(n, m)
    check_method(method)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"transposable_layer_mask needs a torch.Tensor, got {type(weight).__name__}")
    _check_float(weight, "transposable_layer_mask")
    mats = matrices_of(weight, layout)
    _check_matrix(mats, m, "transposable_layer_mask", batched=True)
    return unmatrices(_masks(mats, n, m, method)[0], weight.shape, layout)


def layer_is_transposable_nm(weight: torch.Tensor, n: int, m: int, layout: str = "channels") -> bool:
    """True when every matrix of ``weight`` in ``layout`` (see :func:`transposable_layer_mask`) is
    transposable N:M, i.e. it and its transpose have at most N non-zeros per aligned group of M."""
    n, m = check_nm(n, m)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"layer_is_transposable_nm needs a torch.Tensor, got {type(weight).__name__}")
    mats = matrices_of(weight, layout)
    _check_matrix(mats, m, "layer_is_transposable_nm", batched=True)
    return is_nm(mats, n, m, dim=2) and is_nm(mats, n, m, dim=1)


__all__ = [
    "METHODS",
    "check_method",
    "is_transposable_nm",
    "layer_is_transposable_nm",
    "transposable_layer_mask",
    "transposable_mask",
    "transposable_stats",
]
