"""Mask diversity (Hubara et al., NeurIPS 2021): how many masks a sparsity structure allows.

``mask_diversity(structure, shape, ...)`` is the exact number of keep-masks of one structure for a tensor
of ``shape``, as a Python ``int`` (the numbers get astronomically large; :func:`diversity_log10` turns
them into something printable). N is the number of weights **kept** per group of M.

* ``"unstructured"``: any mask keeping ``density * numel`` weights: ``C(numel, k)``.
* ``"nm"``: ``n`` kept in every group of ``m`` consecutive weights along the last dimension:
  ``C(m, n) ** (numel / m)``.
* ``"transposable"``: ``n`` kept in every row and every column of every aligned ``m x m`` tile of the
  last two dimensions (leading dimensions, e.g. kernel positions, are a batch of matrices):
  ``T(n, m) ** tiles`` with ``T(n, m)`` the number of ``m x m`` 0/1 matrices whose rows and columns all
  sum to ``n`` (:func:`transposable_count`: 90 for 2:4, 24 for 1:4, 116,963,796,250 for 4:8).

``python -c "import nmsparse.masking.diversity as d; d.main()"`` prints the paper-style comparison table of
``docs/transposable.md``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern

STRUCTURES = ("unstructured", "nm", "transposable")


def transposable_count(n: int | NMPattern, m: int | None = None) -> int:
    """Number of ``m x m`` 0/1 matrices with every row and every column summing to ``n``.

    Dynamic programming over the rows. The columns are interchangeable, so the state after ``r`` rows
    is ``c``, the number of columns holding each count ``0..n`` (with its number of matrices); a row puts
    its ``n`` ones into columns below ``n``, taking ``k`` of the ``c[s]`` columns of count ``s`` in
    ``C(c[s], k)`` ways, one count class at a time from the top (so a column moved up is not chosen
    again in the same row). States whose short columns can no longer be filled are dropped. The two
    halves meet in the middle: a state ``c`` after ``a`` rows completes with the states ``reversed(c)``
    after ``m - a`` rows, so the count is ``sum f_a(c) * f_{m-a}(reversed(c)) / N(c)``, with ``N(c)`` the
    number of column labellings of ``c``. About 3 s for 8:16, milliseconds up to m = 10.
    ``0 <= n <= m`` is accepted (``n = 0`` and ``n = m`` give 1), or an :class:`NMPattern` as ``n``.
    Values are cached.
    """
    if isinstance(n, NMPattern) and m is None:
        n, m = n
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    n, m = int(n), int(m)
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"need m >= 1 and 0 <= n <= m, got n={n}, m={m}")
    return _count(n, m)


@functools.lru_cache(maxsize=None)
def _count(n: int, m: int) -> int:
    if n in (0, m):
        return 1
    a = (m + 1) // 2
    states = {(m,) + (0,) * n: 1}
    after = {0: states}
    for r in range(a):
        cur = {(st, n): ways for st, ways in states.items()}  # (state, ones left to place in this row)
        for s in range(n - 1, -1, -1):
            nxt: dict[tuple[tuple[int, ...], int], int] = {}
            for (st, left), ways in cur.items():
                have = st[s]
                for k in range(min(have, left) + 1):
                    if k:
                        moved = list(st)
                        moved[s] -= k
                        moved[s + 1] += k
                        st2 = tuple(moved)
                    else:
                        st2 = st
                    key = (st2, left - k)
                    nxt[key] = nxt.get(key, 0) + ways * math.comb(have, k)
            cur = nxt
        need = n - (m - r - 1)  # a column below this count cannot reach n in the rows left
        states = {}
        for (st, left), ways in cur.items():
            if left == 0 and not any(st[:max(0, need)]):
                states[st] = states.get(st, 0) + ways
        after[r + 1] = states
    first, second = after[a], after[m - a]
    total = 0
    for st, ways in first.items():
        rest = second.get(st[::-1])
        if rest:
            labellings = math.factorial(m)
            for c in st:
                labellings //= math.factorial(c)
            total += ways * rest // labellings
    return total


def _shape(shape: object) -> tuple[int, ...]:
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive integers, got {shape!r}") from None
    if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims):
        raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape!r}")
    return tuple(int(d) for d in dims)


def mask_diversity(
    structure: str,
    shape: Sequence[int],
    n: int | NMPattern | None = None,
    m: int | None = None,
    density: float | None = None,
) -> int:
    """Exact number of keep-masks of ``structure`` for a tensor of ``shape`` (a Python int).

    ``structure`` is ``"unstructured"`` (needs ``density``, the kept fraction, or ``n``/``m`` meaning
    ``density = n/m``; ``density * numel`` must be a whole number), ``"nm"`` (``n`` kept per group of
    ``m`` along the last dimension, which ``m`` must divide) or ``"transposable"`` (``n`` kept in every row
    and column of each aligned ``m x m`` tile of the last two dimensions, which ``m`` must divide).
    ``n`` may be an :class:`NMPattern` (``m`` left out). See the module doc for the formulas. Raises
    ``ValueError`` for anything inconsistent.
    """
    if isinstance(n, NMPattern) and m is None:
        m = n.m
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    dims = _shape(shape)
    numel = math.prod(dims)
    if structure == "unstructured":
        if density is None:
            if n is None or m is None:
                raise ValueError("unstructured diversity needs density (kept fraction) or n and m")
            n, m = check_nm(n, m)
            if (numel * n) % m:
                raise ValueError(f"{n}/{m} of {numel} weights is not a whole number of weights")
            k = numel * n // m
        else:
            if n is not None or m is not None:
                raise ValueError("give either density or n and m for unstructured diversity, not both")
            if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 <= density <= 1:
                raise ValueError(f"density (kept fraction) must be a number in [0, 1], got {density!r}")
            k = round(numel * density)
            if abs(numel * density - k) > 1e-6:
                raise ValueError(f"density {density!r} of {numel} weights is not a whole number of weights")
        return math.comb(numel, k)
    if density is not None:
        raise ValueError(f"{structure!r} diversity is set by n and m; density is only for 'unstructured'")
    if n is None or m is None:
        raise ValueError(f"{structure!r} diversity needs n and m (n kept per group of m)")
    n, m = check_nm(n, m)
    if structure == "nm":
        if dims[-1] % m:
            raise ValueError(f"the last dimension {dims[-1]} of shape {dims} is not a multiple of m={m}")
        return math.comb(m, n) ** (numel // m)
    if len(dims) < 2:
        raise ValueError(f"transposable diversity needs at least 2 dimensions, got shape {dims}")
    if dims[-1] % m or dims[-2] % m:
        raise ValueError(f"the last two dimensions of shape {dims} must be multiples of m={m} (aligned tiles)")
    return transposable_count(n, m) ** (numel // (m * m))


def diversity_log10(value: int) -> float:
    """``log10`` of a (huge) positive integer, exact to float precision (``math.log10`` handles any
    Python int). Raises ``ValueError`` for values below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"diversity_log10 needs a positive integer, got {value!r}")
    return math.log10(value)


# structures of the paper's comparison, at 50% density: (label, structure, n, m)
COMPARISON = (
    ("unstructured 50%", "unstructured", 1, 2),
    ("1:2", "nm", 1, 2),
    ("2:4", "nm", 2, 4),
    ("4:8", "nm", 4, 8),
    ("8:16", "nm", 8, 16),
    ("1:2 transposable", "transposable", 1, 2),
    ("2:4 transposable", "transposable", 2, 4),
    ("4:8 transposable", "transposable", 4, 8),
    ("8:16 transposable", "transposable", 8, 16),
)


def comparison_table(shapes: Sequence[Sequence[int]] = ((8, 8), (16, 16), (256, 256))) -> str:
    """Markdown table of ``log10`` mask diversity of the :data:`COMPARISON` structures (all 50%
    dense) for each shape, with the per-tile transposable counts; structures that do not fit a
    shape are marked ``-``."""
    head = "| structure | " + " | ".join("x".join(map(str, s)) for s in shapes) + " |"
    lines = [head, "|---" * (len(shapes) + 1) + "|"]
    for label, structure, n, m in COMPARISON:
        cells = []
        for s in shapes:
            try:
                cells.append(f"{diversity_log10(mask_diversity(structure, s, n=n, m=m)):,.1f}")
            except ValueError:
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - documentation helper
    print("log10 of the number of masks (mask diversity), all structures keeping 50% of the weights\n")
    print(comparison_table())
    print("\nexact counts for one 8x8 block (64 weights):")
    for label, structure, n, m in COMPARISON:
        if 8 % m == 0:
            v = mask_diversity(structure, (8, 8), n=n, m=m)
            print(f"  {label:<18} {v:>26,}  ({v:.3g})")
    print("\nper-tile transposable counts T(n, m):")
    for n, m in ((1, 2), (1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (8, 16)):
        print(f"  {n}:{m}  {transposable_count(n, m):,}")


