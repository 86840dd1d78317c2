"""Mask diversity: per-tile transposable counts (dynamic programming) against brute force and published
values, the exact formulas per structure, the log10 helper, argument errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nmsparse import diversity_log10, mask_diversity, transposable_count
from nmsparse.masking.diversity import comparison_table


def brute_force_count(n: int, m: int) -> int:
    """m x m 0/1 matrices with all row and column sums n, by enumerating every choice of rows."""
    rows = [np.array([j in s for j in range(m)], dtype=int) for s in itertools.combinations(range(m), n)]
    count = 0
    for choice in itertools.product(range(len(rows)), repeat=m):
        cols = sum(rows[k] for k in choice)
        count += bool((cols == n).all())
    return count


@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (1, 5), (2, 5), (3, 5), (4, 5)])
def test_counts_match_brute_force(n, m):
    assert transposable_count(n, m) == brute_force_count(n, m)


def test_published_counts():
    # Hubara et al.; OEIS A058527 (2k x 2k with line sums k), A001499 (line sums 2), A001501 (line sums 3)
    assert transposable_count(2, 4) == 90
    assert transposable_count(1, 4) == 24
    assert transposable_count(1, 8) == 40320 == math.factorial(8)
    assert transposable_count(2, 8) == 187530840
    assert transposable_count(4, 8) == 116963796250
    assert [transposable_count(k, 2 * k) for k in range(1, 6)] == [2, 90, 297200, 116963796250, 6736218287430460752]
    assert [transposable_count(2, m) for m in range(2, 8)] == [1, 6, 90, 2040, 67950, 3110940]
    assert [transposable_count(3, m) for m in range(3, 8)] == [1, 24, 2040, 297200, 68938800]
    for m in range(1, 9):
        assert transposable_count(1, m) == math.factorial(m)
        assert transposable_count(0, m) == transposable_count(m, m) == 1
        for n in range(m + 1):
            assert transposable_count(n, m) == transposable_count(m - n, m)  # complement symmetry


def test_count_8_16_is_an_exact_int():
    v = transposable_count(8, 16)
    assert isinstance(v, int)
    assert v == 34812290428176298285394893936773707951192224124239796250
    assert v < math.comb(16, 8) ** 16  # fewer than row-wise 8:16 on the same 256 weights


def test_structures():
    assert mask_diversity("nm", (8, 8), n=2, m=4) == 6**16  # 2.8e12 per 64 weights (the paper's example)
    assert mask_diversity("transposable", (8, 8), n=4, m=8) == 116963796250
    assert mask_diversity("transposable", (8, 8), n=2, m=4) == 90**4
    assert mask_diversity("transposable", (3, 8, 16), n=2, m=4) == 90 ** (3 * 2 * 4)  # batch of matrices
    assert mask_diversity("nm", (4, 3, 8), n=1, m=4) == 4 ** 24
    assert mask_diversity("unstructured", (8, 8), density=0.5) == math.comb(64, 32)
    assert mask_diversity("unstructured", (8, 8), n=1, m=4) == math.comb(64, 16)
    assert mask_diversity("unstructured", (10,), density=0.3) == math.comb(10, 3)
    assert mask_diversity("unstructured", (10,), density=0) == 1
    for shape in ((8, 8), (16, 16), (64, 32)):
        u = mask_diversity("unstructured", shape, density=0.5)
        for n, m in ((1, 2), (2, 4), (4, 8)):
            nm = mask_diversity("nm", shape, n=n, m=m)
            t = mask_diversity("transposable", shape, n=n, m=m)
            assert u > nm > t > 1  # the transposable constraint costs diversity
        # at equal sparsity, larger m allows more masks
        assert mask_diversity("nm", shape, n=2, m=4) < mask_diversity("nm", shape, n=4, m=8)
        assert mask_diversity("transposable", shape, n=2, m=4) < mask_diversity("transposable", shape, n=4, m=8)
    # the paper's point: 4:8 transposable keeps more masks than 1:2 row-wise (but fewer than 2:4)
    assert mask_diversity("transposable", (8, 8), n=4, m=8) > mask_diversity("nm", (8, 8), n=1, m=2)


def test_log10():
    assert diversity_log10(1) == 0.0
    assert diversity_log10(10**500) == pytest.approx(500.0)
    assert diversity_log10(mask_diversity("nm", (8, 8), n=2, m=4)) == pytest.approx(16 * math.log10(6))
    big = mask_diversity("unstructured", (128, 128), density=0.5)
    assert diversity_log10(big) == pytest.approx((math.lgamma(16385) - 2 * math.lgamma(8193)) / math.log(10))
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="positive integer"):
            diversity_log10(bad)


def test_errors():
    with pytest.raises(ValueError, match="structure"):
        mask_diversity("blocky", (8, 8), n=2, m=4)
    with pytest.raises(ValueError, match="shape"):
        mask_diversity("nm", (8, 0), n=2, m=4)
    with pytest.raises(ValueError, match="shape"):
        mask_diversity("nm", 8, n=2, m=4)
    with pytest.raises(ValueError, match="needs n and m"):
        mask_diversity("nm", (8, 8))
    with pytest.raises(ValueError, match="0 < n < m"):
        mask_diversity("nm", (8, 8), n=4, m=4)
    with pytest.raises(ValueError, match="multiple of m=4"):
        mask_diversity("nm", (8, 6), n=2, m=4)
    with pytest.raises(ValueError, match="multiples of m=4"):
        mask_diversity("transposable", (6, 8), n=2, m=4)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        mask_diversity("transposable", (16,), n=2, m=4)
    with pytest.raises(ValueError, match="density"):
        mask_diversity("unstructured", (8, 8))
    with pytest.raises(ValueError, match="whole number"):
        mask_diversity("unstructured", (3, 3), density=0.5)
    with pytest.raises(ValueError, match="whole number"):
        mask_diversity("unstructured", (3, 3), n=1, m=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_diversity("unstructured", (8, 8), density=1.5)
    with pytest.raises(ValueError, match="not both"):
        mask_diversity("unstructured", (8, 8), n=2, m=4, density=0.5)
    with pytest.raises(ValueError, match="only for 'unstructured'"):
        mask_diversity("nm", (8, 8), n=2, m=4, density=0.5)
    with pytest.raises(ValueError, match="0 <= n <= m"):
        transposable_count(5, 4)
    with pytest.raises(ValueError, match="integer"):
        transposable_count(2.0, 4)


def test_comparison_table():
    table = comparison_table(((8, 8), (16, 16)))
    lines = table.splitlines()
    assert lines[0] == "| structure | 8x8 | 16x16 |"
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert row["2:4"][0] == f"{16 * math.log10(6):,.1f}"
    assert row["4:8 transposable"][0] == f"{math.log10(116963796250):,.1f}"
    assert row["8:16"][0] == "-" and row["8:16 transposable"][0] == "-"  # 16 does not divide 8
