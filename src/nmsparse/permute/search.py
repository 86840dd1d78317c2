"""Search for the input-channel permutation that lets an N:M mask keep the most importance.

The problem: an importance matrix ``S`` of shape ``(R, C)`` (non-negative: ``|w|`` or a Wanda score;
rows are output channels, kernel positions and every layer tied to the same permutation) and N:M
(N kept of every M). A permutation sorts the C channels into C/M groups of M consecutive columns;
N:M then keeps, in every row, the N largest entries of each group. Only the partition into groups
matters (not the order of the groups nor within a group). Maximise the kept total.

* ``exact``: dynamic programming over subsets of channels (each partition reached once, the
  lowest free channel completed first), affordable while ``2^C`` and the number of candidate groups
  stay small (C <= 20 at M = 4; :func:`exact_cost`).
* ``local``: steepest-ascent local search from the identity. A move re-splits the 2M channels of
  two groups: every one of the C(2M-1, M-1) splits for M <= 4 (35 at M = 4: NVIDIA ASP's "stripe
  group" window of 8 columns), single channel swaps between the two groups for larger M. The best
  move of every pair of groups is cached and only the pairs touching a changed group are
  recomputed. At a local optimum, ``escapes`` random channel swaps perturb the partition and the
  ascent continues; the best partition seen is returned. ``restarts`` (2) such runs with different
  escape streams; the best is kept. Numba runs the inner loops in parallel.

Both start from (and compare against) the identity, so the kept total never goes down.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from functools import lru_cache

import numpy as np
import torch

from nmsparse.plumbing import numba_pool as _numba_pool
from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.permute import kernels

EXACT_MAX_CHANNELS = 20
EXACT_MAX_COST = 4e7  # DP transitions + candidate-group evaluations (row x channel reads)
SEARCHES = ("auto", "exact", "local")


@dataclasses.dataclass
class SearchResult:
    """``perm``: LongTensor (C,), new channel j is old channel ``perm[j]``. ``before`` / ``after``:
    kept importance (sum over rows) with the identity and with ``perm``. ``exact``: the optimum was
    proven (dynamic programming). ``moves``: local-search moves applied. ``time_s``: seconds."""

    perm: torch.Tensor
    before: float
    after: float
    exact: bool
    moves: int
    time_s: float


def kept(score: torch.Tensor, perm: torch.Tensor | None, n: int | NMPattern, m: int | None = None) -> float:
    """Total of ``score`` (R, C) that N:M (N kept per M consecutive columns) keeps after
    reordering its columns by ``perm`` (None: identity). Float64, pure torch (the reference).
    ``n``, ``m``: trusted integers (not checked here), or an :class:`NMPattern` as ``n``."""
    if isinstance(n, NMPattern):
        n, m = n
    s = score.to(torch.float64)
    if perm is not None:
        s = s[:, perm]
    r, c = s.shape
    return float(s.reshape(r, c // m, m).topk(n, dim=2).values.sum())


def exact_cost(c: int, m: int, rows: int) -> float:
    """Upper bound of the work of the exact search on ``c`` channels and ``rows`` rows."""
    if c > EXACT_MAX_CHANNELS:
        return math.inf
    trans = sum(math.comb(c, k * m) * math.comb(c - k * m - 1, m - 1) for k in range(c // m))
    return trans + (1 << c) + math.comb(c, m) * rows * m


def check_score(score: object, n: int | NMPattern, m: int | None = None) -> torch.Tensor:
    """Validate an importance matrix: a 2-D finite, non-negative float tensor of (R, C), C % m == 0
    (``n`` may be an :class:`NMPattern`, ``m`` left out)."""
    n, m = check_nm(n, m)
    if not isinstance(score, torch.Tensor) or score.dim() != 2 or not score.is_floating_point():
        shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(f"score must be a 2-D float tensor (rows, channels), got {shape}")
    if score.shape[1] % m:
        raise ValueError(f"score has {score.shape[1]} channels, not a multiple of m={m}")
    if not torch.isfinite(score).all() or (score < 0).any():
        raise ValueError("score must be finite and non-negative (|w| or a Wanda score)")
    return score


def search_permutation(
    score: torch.Tensor,
    n: int | NMPattern,
    m: int | None = None,
    *,
    search: str = "auto",
    escapes: int = 100,
    seed: int = 0,
    restarts: int = 2,
    max_moves: int = 1_000_000,
) -> SearchResult:
    """Input-channel permutation of ``score`` (R, C) maximising what N:M (N kept per M) keeps.

    ``search``: ``"exact"`` (raises if :func:`exact_cost` is over budget), ``"local"``, or
    ``"auto"`` (exact when affordable, else local). ``escapes``: random perturbations of the local
    search after it converges (each a kick of 1 to 3 random swaps); ``restarts``: independent local
    searches (escape streams ``seed``, ``seed + 1``, ...; one when ``escapes`` is 0), the best is
    kept. Deterministic for a seed. The identity is returned unless the search found a strictly
    better partition; the result is canonical (channels sorted within a group, groups by their first channel).
    ``n`` may be an :class:`NMPattern` (``m`` left out).
    """
    pattern = check_nm(n, m)
    n, m = pattern
    check_score(score, pattern)
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if isinstance(escapes, bool) or not isinstance(escapes, int) or escapes < 0:
        raise ValueError(f"escapes must be an integer >= 0, got {escapes!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    t0 = time.perf_counter()
    r, c = score.shape
    st = np.ascontiguousarray(score.detach().to(torch.float64).cpu().numpy().T)
    ident = torch.arange(c)
    before = kept(score, None, n, m)
    cost = exact_cost(c, m, r)
    if search == "exact" and cost > EXACT_MAX_COST:
        raise ValueError(f"exact search over {c} channels in groups of {m} is too large (at most "
                         f"{EXACT_MAX_CHANNELS} channels and {EXACT_MAX_COST:.0e} steps); use search='local'")
    exact = search == "exact" or (search == "auto" and cost <= EXACT_MAX_COST)
    moves = 0
    if c == m or n == m or r == 0:
        groups, exact = ident.view(-1, m).numpy(), True
    elif exact:
        masks, cols, start = _candidates(c, m)
        vals = _numba_pool.run(kernels.subset_values, st, cols, n)
        picks, _ = _numba_pool.run(kernels.exact_partition, vals, masks, start, c)
        groups = cols[picks]
    else:
        split_a, split_b = _splits(m)
        tol = 1e-12 * max(float(st.sum()), 1e-300)
        start = ident.view(-1, m).numpy().copy()
        g = start.shape[0]
        gain0, which0 = np.full((g, g), -np.inf), np.zeros((g, g), np.int64)
        if g * g * r * split_a.shape[0] > kernels.PARALLEL_WORK:  # compile the parallel kernel only if worth it
            _numba_pool.run(kernels.refresh_parallel, st, start, n, split_a, split_b, gain0, which0, np.arange(g))
        else:
            _numba_pool.run(kernels.refresh_all, st, start, n, split_a, split_b, gain0, which0)
        best_val = -np.inf
        for k in range(restarts if escapes else 1):  # runs from the identity, different escape streams
            # (without escapes every run is the same deterministic ascent: one is enough)
            found, val, mv = _numba_pool.run(kernels.local_search, st, start.copy(), n, split_a, split_b, gain0.copy(),
                                         which0.copy(), escapes, seed + k, tol, max_moves)
            moves += int(mv)
            if val > best_val:
                best_val, groups = val, found
    perm = _canonical(torch.as_tensor(np.asarray(groups), dtype=torch.long))
    after = kept(score, perm, n, m)
    if not after > before:
        perm, after = ident, before
    return SearchResult(perm, before, after, exact, int(moves), time.perf_counter() - t0)


def _canonical(groups: torch.Tensor) -> torch.Tensor:
    g = groups.sort(dim=1).values
    return g[g[:, 0].argsort()].reshape(-1)


@lru_cache(maxsize=None)
def _candidates(c: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every m-subset of c channels, sorted by lowest channel: (bitmasks, columns, start offsets)."""
    combos = np.array(list(itertools.combinations(range(c), m)), dtype=np.int64)  # lexicographic
    masks = (np.int64(1) << combos).sum(1)
    start = np.searchsorted(combos[:, 0], np.arange(c + 1)).astype(np.int64)
    return masks, combos, start


@lru_cache(maxsize=None)
def _splits(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves of a pair of groups, as positions 0..2m-1 (first group's channels first); row 0 is the
    current split. m <= 4: every split of the 2m channels into two groups of m; else single swaps."""
    pos = range(2 * m)
    if m <= 4:
        a = [(0, *rest) for rest in itertools.combinations(range(1, 2 * m), m - 1)]
    else:
        a = [tuple(range(m))]
        for i in range(m):
            for j in range(m, 2 * m):
                a.append(tuple(sorted(set(range(m)) - {i} | {j})))
    b = [tuple(p for p in pos if p not in s) for s in a]
    return np.array(a, np.int64), np.array(b, np.int64)
