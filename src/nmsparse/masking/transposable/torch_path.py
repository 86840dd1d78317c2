"""The torch path of transposable N:M masks (CUDA, or the CPU without numba).

The algorithms of :mod:`~nmsparse.masking.transposable.kernels`, vectorised over tiles, with the same
float operations in the same order and the same tie-breaking (first index of a min / max), so both
paths give identical masks:

* :func:`_tiles_of` / :func:`_untile`: (B, R, C) tensors to (T, m, m) float64 magnitude tiles and back;
* :func:`_solve_torch`: the exact solver (mirrors ``_solve_tile``);
* :func:`_greedy_torch`, :func:`_repair_torch` (with :func:`_augment_torch`): the greedy and its
  completion with the half-of-optimum certificate (mirror ``_greedy_tile`` and ``_repair_tile``);
* :func:`_torch_masks`: the masks of a (B, R, C) tensor; for small ``n`` the approx path runs
  without host reads but one.

``n, m`` here are trusted integers (checked by the public functions).
"""

from __future__ import annotations

import torch

_INF = float("inf")


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
