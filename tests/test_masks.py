"""nm_mask / is_nm: invariants (hypothesis), a brute-force reference, both back ends, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse import is_nm, nm_mask
from nmsparse.masking import nm as nmmasks

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def reference_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Brute force: per group, sort indices by (magnitude desc, NaN largest, index asc); keep n."""
    x = w.movedim(dim, -1).double()
    flat = x.reshape(-1, m).tolist()
    out = []
    for group in flat:
        key = lambda i: (0 if math.isnan(group[i]) else 1, -abs(group[i]) if not math.isnan(group[i]) else 0, i)
        keep = set(sorted(range(m), key=key)[:n])
        out.append([i in keep for i in range(m)])
    return torch.tensor(out, dtype=torch.bool).reshape(x.shape).movedim(-1, dim)


@st.composite
def problems(draw):
    m = draw(st.sampled_from([2, 3, 4, 5, 8, 16]))
    n = draw(st.integers(1, m - 1))
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    dim = draw(st.integers(-ndim, ndim - 1))
    shape[dim] = m * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(FLOATS))
    # a small pool of values makes ties frequent; specials test NaN / inf / signed zeros
    pool = draw(st.sampled_from([[0.0, 1.0, -1.0, 2.0], [0.5, -0.5, 3.0, -7.0, 1e-3, 0.0]]))
    specials = [float("nan"), float("inf"), float("-inf"), -0.0]
    values = st.one_of(st.sampled_from(pool + specials), st.floats(-100, 100, width=16))
    data = draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(data, dtype=torch.float64).to(dtype).reshape(shape), n, m, dim


@settings(max_examples=300, deadline=None)
@given(problems())
def test_matches_brute_force_and_invariants(p):
    w, n, m, dim = p
    mask = nm_mask(w, n, m, dim)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    counts = mask.movedim(dim, -1).reshape(-1, m).sum(-1)
    assert bool((counts == n).all()), "exactly n kept per group"
    assert torch.equal(mask, reference_mask(w, n, m, dim))
    assert is_nm(torch.where(mask, w, torch.zeros_like(w)), n, m, dim)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (8, 16), (3, 5), (5, 40)])
def test_kernel_and_torch_paths_agree(dtype, n, m, monkeypatch):
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randn(64, 8 * m, generator=g).to(dtype)
    w[w.abs() < 0.3] = 0.25  # plenty of ties (exact in every dtype)
    w[0, :3] = float("nan")
    w[1, 1] = float("inf")
    monkeypatch.setattr(nmmasks, "_KERNEL_MIN_NUMEL", 0)
    kernel = nm_mask(w, n, m)
    monkeypatch.setattr(nmmasks, "_kernels", None)
    torch_path = nm_mask(w, n, m)
    assert torch.equal(kernel, torch_path)
    assert torch.equal(kernel, reference_mask(w, n, m, -1))


def test_large_tensor_goes_through_kernel_and_is_exact():
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    assert w.numel() >= nmmasks._KERNEL_MIN_NUMEL
    mask = nm_mask(w, 2, 4)
    ref = torch.zeros_like(mask).view(-1, 4)
    ref.scatter_(1, w.abs().view(-1, 4).topk(2, dim=1).indices, True)  # no ties in random floats
    assert torch.equal(mask, ref.view_as(mask))


def test_ties_go_to_lower_index_and_nan_is_largest():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [float("nan"), 5.0, float("inf"), float("nan")]])
    assert nm_mask(w, 2, 4).tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, False, False, True],
    ]
    assert nm_mask(w, 3, 4)[2].tolist() == [True, False, True, True]


def test_signed_zero_and_negative_magnitudes():
    w = torch.tensor([-0.0, 0.0, -3.0, 2.0])
    assert nm_mask(w, 2, 4).tolist() == [False, False, True, True]
    assert nm_mask(w, 3, 4).tolist() == [True, False, True, True]


def test_non_contiguous_and_other_dims():
    w = torch.randn(8, 12, 6, generator=torch.Generator().manual_seed(3)).transpose(0, 2)  # (6, 12, 8)
    for dim in range(3):
        if w.shape[dim] % 2 == 0:
            mask = nm_mask(w, 1, 2, dim)
            assert torch.equal(mask, reference_mask(w, 1, 2, dim))


def test_empty_tensor():
    assert nm_mask(torch.empty(0, 8), 2, 4).shape == (0, 8)


def test_result_does_not_require_grad_and_input_untouched():
    w = torch.randn(4, 8, requires_grad=True)
    before = w.detach().clone()
    mask = nm_mask(w, 2, 4)
    assert not mask.requires_grad and torch.equal(w.detach(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = torch.randn(256, 512)
    assert torch.equal(nm_mask(w.cuda(), 2, 4).cpu(), nm_mask(w, 2, 4))


def test_is_nm():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert is_nm(w[:1], 2, 4) and not is_nm(w, 2, 4) and is_nm(w, 3, 4)
    assert is_nm(torch.tensor([True, False, False, False]), 1, 4)
    assert not is_nm(torch.tensor([float("nan"), 0.0, 1.0, 0.0]), 1, 4), "NaN is non-zero"
    assert is_nm(w.t(), 1, 2, dim=0) is False
    assert is_nm(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1, 2, dim=0)


@pytest.mark.parametrize(
    "args,match",
    [
        ((2.0, 4), "n must be an integer"),
        ((2, "4"), "m must be an integer"),
        ((True, 4), "n must be an integer"),
        ((0, 4), "0 < n < m"),
        ((4, 4), "0 < n < m"),
        ((5, 4), "0 < n < m"),
        ((-1, 4), "0 < n < m"),
    ],
)
def test_bad_n_m(args, match):
    with pytest.raises(ValueError, match=match):
        nm_mask(torch.randn(4, 8), *args)
    with pytest.raises(ValueError, match=match):
        is_nm(torch.randn(4, 8), *args)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"size 6 along dim 1 .* not a multiple of m=4"):
        nm_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError, match=r"size 6 along dim 1 .* not a multiple of m=4"):
        is_nm(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError, match="floating-point"):
        nm_mask(torch.ones(4, 8, dtype=torch.int32), 2, 4)
    with pytest.raises(ValueError, match="floating-point"):
        nm_mask(torch.ones(4, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        nm_mask(torch.randn(4, 8), 2, 4, dim=2)
    with pytest.raises(ValueError, match="scalar"):
        nm_mask(torch.tensor(1.0), 1, 2)
    with pytest.raises(ValueError, match="torch.Tensor"):
        nm_mask([1.0, 2.0, 3.0, 4.0], 2, 4)


def test_kernel_leaves_torch_thread_count_alone(run_with_one_numba_thread):
    code = (
        "import torch, nmsparse; before = torch.get_num_threads(); "
        "nmsparse.nm_mask(torch.randn(512, 512), 2, 4); print(before, torch.get_num_threads())"
    )
    before, after = run_with_one_numba_thread(code).split()
    assert before == after
