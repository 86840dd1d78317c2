"""Transposable N:M masks: validity, exact optimality against independent solvers, the approximation's
bound, dtypes/devices, NaN handling, the torch path (CUDA's) against the numba kernel, layer helpers."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import torch
from scipy.optimize import linprog

import nmsparse
import nmsparse.masking.transposable as T
from nmsparse import is_nm, is_transposable_nm, nm_mask, transposable_layer_mask, transposable_mask
from nmsparse.masking.layout import matrices_of
from nmsparse.masking.pattern import NMPattern

CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------------


def tiles_of(x: np.ndarray, m: int) -> np.ndarray:
    """(R, C) -> (R/m * C/m, m, m): the aligned 2-D tiles, row-major."""
    r, c = x.shape
    return x.reshape(r // m, m, c // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)


def lp_optimum(a: np.ndarray, n: int) -> float:
    """max sum a*x s.t. every row and column of x sums to n, 0 <= x <= 1 (scipy HiGHS)."""
    m = a.shape[0]
    eq = np.zeros((2 * m, m * m))
    for i in range(m):
        eq[i, i * m : (i + 1) * m] = 1
        eq[m + i, i::m] = 1
    res = linprog(-a.ravel(), A_eq=eq, b_eq=np.full(2 * m, n), bounds=(0, 1), method="highs")
    assert res.status == 0
    return -res.fun


def flow_optimum(a: np.ndarray, n: int) -> int:
    """Integer min-cost flow optimum (networkx network simplex) for an integer tile ``a``."""
    m = a.shape[0]
    g = nx.DiGraph()
    for i in range(m):
        g.add_edge("s", ("r", i), capacity=n, weight=0)
        g.add_edge(("c", i), "t", capacity=n, weight=0)
        for j in range(m):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(a[i, j]))
    flow = nx.max_flow_min_cost(g, "s", "t")
    assert sum(flow["s"].values()) == n * m
    return -nx.cost_of_flow(g, flow)


@pytest.fixture(scope="module")
def patterns():
    """All m x m 0/1 matrices with every row and column summing to n, by brute force, for m = 4."""
    out = {}
    for n in (1, 2, 3):
        rows = [np.array([j in s for j in range(4)]) for s in itertools.combinations(range(4), n)]
        pats = [np.stack(p) for p in itertools.product(rows, repeat=4)]
        out[n] = np.stack([p for p in pats if (p.sum(0) == n).all()])
    return out


def greedy_reference(a: np.ndarray, n: int) -> np.ndarray:
    """The paper's greedy on one tile (decreasing value, ties row-major), without completion."""
    m = a.shape[0]
    x = np.zeros((m, m), bool)
    rc, cc = np.zeros(m, int), np.zeros(m, int)
    for q in np.argsort(-a.ravel(), kind="stable"):
        i, j = divmod(int(q), m)
        if rc[i] < n and cc[j] < n:
            x[i, j] = True
            rc[i] += 1
            cc[j] += 1
    return x


def random_tiles(rng: np.random.Generator, count: int, m: int) -> np.ndarray:
    """Tiles of several kinds: continuous, small integers (many ties), two values, constant, zeros."""
    kinds = [
        lambda: rng.standard_normal((m, m)),
        lambda: rng.integers(-3, 4, (m, m)).astype(float),
        lambda: rng.choice([0.0, 1.0], (m, m)),
        lambda: np.full((m, m), 0.5),
        lambda: np.zeros((m, m)),
        lambda: rng.integers(0, 2, (m, m)) * rng.standard_normal(),
    ]
    return np.stack([kinds[t % len(kinds)]() for t in range(count)])


def as_matrix(tiles: np.ndarray, per_row: int) -> torch.Tensor:
    """Arrange (k, m, m) tiles as a matrix of tiles (k / per_row rows of tiles)."""
    k, m, _ = tiles.shape
    return torch.from_numpy(
        tiles.reshape(k // per_row, per_row, m, m).transpose(0, 2, 1, 3).reshape(k // per_row * m, per_row * m)
    )


def assert_balanced(mask: torch.Tensor, n: int, m: int) -> None:
    t = tiles_of(mask.cpu().numpy(), m)
    assert (t.sum(1) == n).all() and (t.sum(2) == n).all()


# ------------------------------------------------------------------------------------------------
# optimality
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_optimal_matches_exhaustive_enumeration_m4(patterns, n):
    pats = patterns[n]
    assert len(pats) == {1: 24, 2: 90, 3: 24}[n]
    rng = np.random.default_rng(n)
    tiles = random_tiles(rng, 240, 4)
    w = as_matrix(tiles, 16)
    mask = transposable_mask(w, n, 4)
    assert_balanced(mask, n, 4)
    got = tiles_of(mask.numpy(), 4)
    for a, x in zip(np.abs(tiles), got):
        best = max((a * p).sum() for p in pats)
        assert (a * x).sum() == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    "n,m", [(1, 4), (2, 4), (3, 4)] + [(k, 8) for k in range(1, 8)] + [(1, 16), (4, 16), (8, 16), (13, 16), (15, 16)]
)
def test_optimal_matches_linprog(n, m):
    rng = np.random.default_rng(100 * m + n)
    count = {4: 48, 8: 24, 16: 12}[m]
    tiles = random_tiles(rng, count, m)
    tiles[::3] = rng.random((len(tiles[::3]), m, m))  # plenty of continuous tiles too
    w = as_matrix(tiles, 4)
    for method in ("optimal", "approx"):
        mask = transposable_mask(w, n, m, method=method)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert_balanced(mask, n, m)
        got = tiles_of(mask.numpy(), m)
        for a, x in zip(np.abs(tiles), got):
            opt = lp_optimum(a, n)
            kept = (a * x).sum()
            if method == "optimal":
                assert kept == pytest.approx(opt, rel=1e-9, abs=1e-9)
            else:
                assert kept >= opt / 2 - 1e-9
                assert kept <= opt + 1e-9


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (8, 16), (5, 16)])
def test_optimal_exact_on_integer_ties_against_min_cost_flow(n, m):
    """Integer tiles with many ties and repeated values: the kept total equals networkx's exactly."""
    rng = np.random.default_rng(7 * m + n)
    tiles = np.concatenate(
        [
            rng.integers(0, 3, (16, m, m)),
            rng.integers(0, 100, (8, m, m)),
            np.full((4, m, m), 5),
            np.zeros((4, m, m), dtype=np.int64),
            np.tile(rng.integers(0, 4, (4, 1, m)), (1, m, 1)),  # every row the same
            np.tile(rng.integers(0, 4, (4, m, 1)), (1, 1, m)),  # every column the same
        ]
    ).astype(float)
    signs = rng.choice([-1.0, 1.0], tiles.shape)
    w = as_matrix(tiles * signs, 8)
    mask = transposable_mask(w, n, m)
    assert_balanced(mask, n, m)
    for a, x in zip(tiles, tiles_of(mask.numpy(), m)):
        assert (a * x).sum() == flow_optimum(a, n)


def test_optimal_is_deterministic_and_ignores_signs():
    w = torch.randn(64, 64)
    w[:8] = torch.randint(0, 3, (8, 64)).float()
    a = transposable_mask(w, 4, 8)
    assert torch.equal(a, transposable_mask(w.clone(), 4, 8))
    assert torch.equal(a, transposable_mask(-w, 4, 8))


def test_constant_tile_is_balanced_without_search():
    mask = transposable_mask(torch.ones(16, 16), 3, 8)
    assert_balanced(mask, 3, 8)


# ------------------------------------------------------------------------------------------------
# the approximation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8), (8, 16), (3, 16)])
def test_approx_is_the_greedy_where_it_completes_and_complete_everywhere(n, m):
    rng = np.random.default_rng(m + 31 * n)
    tiles = random_tiles(rng, 96, m)
    tiles[::2] = rng.standard_normal((48, m, m))
    w = as_matrix(tiles, 8)
    stats = T.transposable_stats(w, n, m, "approx")
    mask = stats["mask"]
    assert torch.equal(mask, transposable_mask(w, n, m, method="approx"))
    assert_balanced(mask, n, m)
    short = 0
    for a, x in zip(np.abs(tiles), tiles_of(mask.numpy(), m)):
        g = greedy_reference(a, n)
        if g.sum() == n * m:
            assert (x == g).all()
        else:
            short += 1
            assert 2 * (a * x).sum() >= lp_optimum(a, n) - 1e-9
    assert stats["short"] == short
    assert stats["tiles"] == len(tiles)


def test_greedy_alone_leaves_tiles_short_and_approx_fixes_them():
    """The plain greedy strands rows below n on a fair share of random tiles (why completion is needed)."""
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    for n, m, low in ((2, 4, 0.10), (4, 8, 0.40)):
        stats = T.transposable_stats(w, n, m, "approx")
        assert stats["short"] / stats["tiles"] > low
        assert_balanced(stats["mask"], n, m)
        opt = T.transposable_stats(w, n, m, "optimal")
        assert opt["short"] == 0
        assert opt["kept_abs"] >= stats["kept_abs"] >= 0.97 * opt["kept_abs"]


def test_approx_half_bound_on_adversarial_tile():
    # greedy takes the 1.0 + eps entries, the best mask takes the 1.0s: ratio close to 1/2
    eps = 1e-3
    a = np.array([[1 + eps, 1.0], [1.0, 0.0]])
    w = torch.tensor(np.kron(np.ones((2, 2)), a))  # 1:2 on 2x2 tiles
    for method in ("approx", "optimal"):
        mask = transposable_mask(w, 1, 2, method=method)
        assert_balanced(mask, 1, 2)
        for x in tiles_of(mask.numpy(), 2):
            kept = (a * x).sum()
            assert kept >= 2.0 / 2
            if method == "optimal":
                assert kept == 2.0


# ------------------------------------------------------------------------------------------------
# 2-D tiles, not the authors' reshaped rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["optimal", "approx"])
def test_tiles_are_aligned_2d_blocks(method):
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    mask = transposable_mask(w, 2, 4, method=method)
    assert is_nm(mask, 2, 4, dim=1) and is_nm(mask, 2, 4, dim=0)
    assert is_nm(mask.T, 2, 4, dim=-1)
    assert is_transposable_nm(mask, 2, 4) and is_transposable_nm(w * mask, 2, 4)
    # each block w[i:i+4, j:j+4] gets the mask of that block alone
    for i, j in [(0, 0), (4, 8), (60, 124), (16, 32)]:
        blk = w[i : i + 4, j : j + 4]
        assert torch.equal(mask[i : i + 4, j : j + 4], transposable_mask(blk, 2, 4, method=method))


def test_authors_row_tiles_are_not_transposable():
    """m*m consecutive weights of one row reshaped to m x m (the authors' code) constrain nothing along
    the output axis; aligned 2-D tiles do."""
    torch.manual_seed(2)
    w = torch.randn(64, 64)
    chunks = w.reshape(-1, 4, 4)  # 16 consecutive weights of a row as one "tile"
    side = transposable_mask(torch.cat(list(chunks), dim=1), 2, 4)  # tile k of this is chunks[k]
    fake = side.reshape(4, -1, 4).permute(1, 0, 2).reshape(64, 64)
    assert is_nm(fake, 2, 4, dim=1) and not is_nm(fake, 2, 4, dim=0)
    plain = nm_mask(w, 2, 4)
    assert is_nm(plain, 2, 4) and not is_transposable_nm(plain, 2, 4)
    ours = transposable_mask(w, 2, 4)
    assert is_transposable_nm(ours, 2, 4)
    assert ours.sum() == plain.sum() == w.numel() // 2


# ------------------------------------------------------------------------------------------------
# dtypes, devices, NaN, shapes, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["optimal", "approx"])
def test_dtypes(dtype, method):
    torch.manual_seed(3)
    w = torch.randn(32, 48).to(dtype)
    mask = transposable_mask(w, 2, 4, method=method)
    assert mask.dtype == torch.bool and mask.shape == w.shape and mask.device == w.device
    assert torch.equal(mask, transposable_mask(w.double(), 2, 4, method=method))
    assert_balanced(mask, 2, 4)


def test_non_contiguous_input():
    torch.manual_seed(4)
    base = torch.randn(64, 32)
    w = base.T  # (32, 64), not contiguous
    assert not w.is_contiguous()
    assert torch.equal(transposable_mask(w, 4, 8), transposable_mask(w.contiguous(), 4, 8))


def test_nan_and_inf_rank_as_largest():
    w = torch.rand(8, 8)
    w[0, 3] = float("nan")
    w[5, 5] = float("inf")
    w[6, 1] = -float("inf")
    for method in ("optimal", "approx"):
        mask = transposable_mask(w, 2, 4, method=method)
        assert_balanced(mask, 2, 4)
        assert mask[0, 3] and mask[5, 5] and mask[6, 1]
    # more non-finite entries than fit: as many as possible are kept (n per row and column)
    w = torch.full((4, 4), float("nan"))
    mask = transposable_mask(w, 2, 4)
    assert_balanced(mask, 2, 4)
    w = torch.rand(4, 4)
    w[0] = float("inf")
    w[:, 0] = float("nan")
    mask = transposable_mask(w, 1, 4)
    assert_balanced(mask, 1, 4)
    assert mask[0].sum() == 1 and mask[:, 0].sum() == 1


def test_empty_and_general_m():
    assert transposable_mask(torch.zeros(0, 8), 2, 4).shape == (0, 8)
    for n, m in ((1, 2), (1, 3), (2, 3), (2, 5), (3, 6), (5, 12)):
        w = torch.randn(2 * m, 3 * m)
        for method in ("optimal", "approx"):
            assert_balanced(transposable_mask(w, n, m, method=method), n, m)


def test_errors_say_what_is_wrong():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="2-D"):
        transposable_mask(torch.randn(8), 2, 4)
    with pytest.raises(ValueError, match="2-D"):
        transposable_mask(torch.randn(2, 8, 8), 2, 4)
    with pytest.raises(ValueError, match="multiples of m=4"):
        transposable_mask(torch.randn(6, 8), 2, 4)
    with pytest.raises(ValueError, match="multiples of m=4"):
        transposable_mask(torch.randn(8, 10), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        transposable_mask(w, 4, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        transposable_mask(w, 0, 4)
    with pytest.raises(ValueError, match="n must be an integer"):
        transposable_mask(w, 2.0, 4)
    with pytest.raises(ValueError, match="method"):
        transposable_mask(w, 2, 4, method="exact")
    with pytest.raises(ValueError, match="floating-point"):
        transposable_mask(torch.ones(8, 8, dtype=torch.int32), 2, 4)
    with pytest.raises(ValueError, match="torch.Tensor"):
        transposable_mask(np.ones((8, 8)), 2, 4)
    with pytest.raises(ValueError, match="2-D"):
        is_transposable_nm(torch.ones(8), 2, 4)
    with pytest.raises(ValueError, match="multiples"):
        is_transposable_nm(torch.ones(8, 6), 2, 4)


def test_is_transposable_nm():
    assert is_transposable_nm(torch.zeros(8, 8), 2, 4)
    eye = torch.eye(8)
    assert is_transposable_nm(eye, 1, 4)
    bad = torch.zeros(4, 4)
    bad[0, :2] = 1
    bad[1, :2] = 1
    bad[2, :2] = 1  # column 0 holds 3
    assert is_nm(bad, 2, 4) and not is_transposable_nm(bad, 2, 4)
    nan = torch.zeros(4, 4)
    nan[:3, 0] = float("nan")
    assert not is_transposable_nm(nan, 2, 4)


# ------------------------------------------------------------------------------------------------
# the torch path (what CUDA runs) gives the kernel's masks
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setattr(T.api, "_FORCE_TORCH", True)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 8), (6, 8), (8, 16), (3, 16)])
@pytest.mark.parametrize("method", ["optimal", "approx"])
def test_torch_path_equals_kernel(n, m, method, monkeypatch):
    torch.manual_seed(10 * m + n)
    w = torch.randn(8 * m, 6 * m)
    w[: 2 * m] = torch.randint(-2, 3, (2 * m, 6 * m)).float()
    w[2 * m : 3 * m, : 2 * m] = 0.25
    w[3, 5] = float("nan")
    w[3 * m, 7] = float("inf")
    kernel = T._masks(w.unsqueeze(0), n, m, method)
    monkeypatch.setattr(T.api, "_FORCE_TORCH", True)
    path = T._masks(w.unsqueeze(0), n, m, method)
    assert torch.equal(kernel[0], path[0])
    assert kernel[1:] == path[1:]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["optimal", "approx"])
def test_cuda_matches_cpu(dtype, method):
    torch.manual_seed(5)
    w = torch.randn(256, 512).to(dtype)
    for n, m in ((2, 4), (4, 8), (8, 16)):
        gpu = transposable_mask(w.cuda(), n, m, method=method)
        assert gpu.is_cuda and gpu.dtype == torch.bool
        cpu = transposable_mask(w, n, m, method=method)
        if (n, m, method) == (2, 4, "optimal"):  # CUDA scores the 90 patterns: ties may pick another optimum
            assert_balanced(gpu.cpu(), n, m)
            a = w.abs().double()
            assert torch.allclose((a * gpu.cpu()).sum(), (a * cpu).sum(), rtol=1e-12, atol=0)
            assert (gpu.cpu() != cpu).float().mean() < 0.01
        else:
            assert torch.equal(gpu.cpu(), cpu)


@pytest.fixture
def patterns_made(monkeypatch):
    """The NMPattern values constructed while the test runs (one entry per construction)."""
    made = []
    post = NMPattern.__post_init__

    def counting(self):
        made.append((self.n, self.m))
        post(self)

    monkeypatch.setattr(NMPattern, "__post_init__", counting)
    return made


def test_a_pattern_is_taken_as_n_and_n_m_are_checked_once(patterns_made):
    """Every public function takes ``n, m`` or a pattern as ``n``, gives the same answer, and makes
    exactly one pattern from integers (none from a pattern) however deep the call goes."""
    torch.manual_seed(9)
    w, conv = torch.randn(16, 32), torch.randn(16, 8, 3, 3)
    mask, conv_mask = transposable_mask(w, 2, 4, "approx"), transposable_layer_mask(conv, 2, 4)
    calls = {
        "transposable_mask": lambda *nm: transposable_mask(w, *nm, method="approx"),
        "transposable_stats": lambda *nm: T.transposable_stats(w, *nm)["mask"],
        "transposable_layer_mask": lambda *nm: transposable_layer_mask(conv, *nm),
        "is_transposable_nm": lambda *nm: (is_transposable_nm(mask, *nm), is_transposable_nm(w, *nm)),
        "layer_is_transposable_nm": lambda *nm: (nmsparse.layer_is_transposable_nm(conv_mask, *nm),
                                                 nmsparse.layer_is_transposable_nm(conv, *nm)),
    }
    p = NMPattern(2, 4)
    for name, f in calls.items():
        patterns_made.clear()
        from_ints = f(2, 4)
        per_call = 2 if name.startswith(("is_", "layer_is")) else 1
        assert patterns_made == [(2, 4)] * per_call, name
        patterns_made.clear()
        from_pattern, with_m = f(p), f(p, 4)
        assert patterns_made == [], name
        for got in (from_pattern, with_m):
            assert (torch.equal(got, from_ints) if isinstance(got, torch.Tensor) else got == from_ints), name
    assert calls["is_transposable_nm"](2, 4) == (True, False)
    assert calls["layer_is_transposable_nm"](2, 4) == (True, False)
    with pytest.raises(ValueError, match="pass one or the other"):
        transposable_mask(w, p, 8)


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------


def test_layer_mask_linear_and_conv():
    torch.manual_seed(6)
    lin = torch.randn(16, 32)
    assert torch.equal(transposable_layer_mask(lin, 2, 4, "optimal"), transposable_mask(lin, 2, 4))
    conv = torch.randn(16, 8, 3, 3)
    mask = transposable_layer_mask(conv, 2, 4, "optimal")
    assert mask.shape == conv.shape
    for kh in range(3):
        for kw in range(3):
            assert torch.equal(mask[:, :, kh, kw], transposable_mask(conv[:, :, kh, kw], 2, 4))
    assert is_nm(mask, 2, 4, dim=1) and is_nm(mask, 2, 4, dim=0)
    assert nmsparse.layer_is_transposable_nm(mask, 2, 4) and nmsparse.layer_is_nm(mask, 2, 4)
    flat = transposable_layer_mask(conv, 2, 4, "approx", layout="flat")
    assert torch.equal(flat.reshape(16, -1), transposable_mask(conv.reshape(16, -1), 2, 4, "approx"))
    assert nmsparse.layer_is_transposable_nm(flat, 2, 4, layout="flat")
    assert matrices_of(conv, "channels").shape == (9, 16, 8)
    conv1d = torch.randn(8, 4, 5)
    assert_balanced(transposable_layer_mask(conv1d, 2, 4)[:, :, 2], 2, 4)
    with pytest.raises(ValueError, match="multiples of m=4"):
        transposable_layer_mask(torch.randn(6, 8, 3, 3), 2, 4)
    with pytest.raises(ValueError, match="layout"):
        transposable_layer_mask(conv, 2, 4, layout="rows")


@pytest.mark.parametrize("n,m", [(4, 8), (2, 4)])  # 2:4 runs the fixed-round repair
def test_failed_certificate_falls_back_to_the_exact_solver(monkeypatch, n, m):
    """When a completed tile cannot be certified, the tile is solved exactly (torch path wiring):
    every tile the greedy left short is the optimal solver's, every other tile the greedy's."""
    torch.manual_seed(8)
    w = torch.randn(64, 64)
    monkeypatch.setattr(T.api, "_FORCE_TORCH", True)
    monkeypatch.setattr(T.torch_path, "_repair_torch", lambda a, x, n, m, rounds=None: torch.zeros(a.shape[0], dtype=torch.bool))
    mask, short, exact = T._masks(w.unsqueeze(0), n, m, "approx")
    assert short == exact > 0
    raw = T._greedy_torch(T._tiles_of(w.unsqueeze(0), m), n, m)  # the greedy before any repair
    short_tiles = raw.flatten(1).sum(1) < n * m
    assert int(short_tiles.sum()) == short
    monkeypatch.setattr(T.api, "_FORCE_TORCH", False)
    opt, approx = transposable_mask(w, n, m), transposable_mask(w, n, m, "approx")
    for x, o, g, s in zip(tiles_of(mask[0].numpy(), m), tiles_of(opt.numpy(), m), raw.numpy(), short_tiles):
        assert (x == o).all() if s else (x == g).all()
    assert_balanced(mask[0], n, m)
    a = w.abs().numpy()
    assert (a * mask[0].numpy()).sum() >= (a * approx.numpy()).sum() - 1e-9


def test_kernel_leaves_torch_thread_count_alone(run_with_one_numba_thread):
    code = (
        "import torch, nmsparse; torch.set_num_threads(2); "
        "nmsparse.transposable_mask(torch.randn(64, 64), 2, 4); print(torch.get_num_threads())"
    )
    assert run_with_one_numba_thread(code).strip() == "2"


# ------------------------------------------------------------------------------------------------
# the approx repair without host reads (fixed rounds over every tile) gives the gathering repair's masks
# ------------------------------------------------------------------------------------------------


def _hard_tiles(n, m, seed, rows=16, cols=12):
    torch.manual_seed(seed)
    w = torch.randn(rows * m, cols * m)
    w[: 4 * m] = torch.randint(-2, 3, (4 * m, cols * m)).float()  # many ties
    w[4 * m : 5 * m, : 3 * m] = 0.5
    w[4 * m + 1, 3] = float("nan")
    w[6 * m, 5] = float("inf")
    return T._tiles_of(w.unsqueeze(0), m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8), (3, 8), (4, 8), (3, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_round_repair_equals_gathering_repair(n, m, seed):
    rows, cols = (16, 12) if m < 16 else (8, 6)
    a = _hard_tiles(n, m, seed, rows, cols)
    x0 = T._greedy_torch(a, n, m)
    short = (x0.flatten(1).sum(1) < n * m).nonzero().squeeze(1)
    assert (short.numel() > 0) == (n > 1)  # a 1:m greedy is always complete (the bound (n-1)**2 = 0)
    xs = x0[short].clone()
    good_gather = T._repair_torch(a[short], xs, n, m)
    x_fixed = x0.clone()
    good_fixed = T._repair_torch(a, x_fixed, n, m, rounds=(n - 1) ** 2)
    assert torch.equal(x_fixed[short], xs)
    assert torch.equal(good_fixed[short], good_gather)
    complete = torch.ones(a.shape[0], dtype=torch.bool)
    complete[short] = False
    assert torch.equal(x_fixed[complete], x0[complete]) and good_fixed[complete].all()
    assert_balanced(T._untile(x_fixed, (1, rows * m, cols * m), m)[0], n, m)
