"""compress/decompress: exact round trips (hypothesis), the documented bit layout against an
independent pure-Python packer, the numba and torch paths byte for byte, and every error."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmsparse
from nmsparse.export import NMCompressed, compress, decompress

C = importlib.import_module("nmsparse.export.compress")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}


@pytest.fixture(params=["torch", "numba"])
def path(request, monkeypatch):
    """Run a test on the torch path and again on the numba kernel (threshold lowered to 0)."""
    monkeypatch.setattr(C, "KERNEL_MIN_NUMEL", 0 if request.param == "numba" else 1 << 62)
    return request.param


def nm_tensor(shape, n, m, dim, dtype, seed, specials=True, sparse_frac=0.3):
    """A random N:M tensor along ``dim`` with NaN/inf/-0.0 among the kept values, some groups with
    fewer than n non-zeros, and -0.0 at some pruned positions (as finalize leaves them)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if specials and w.numel():
        flat = w.view(-1)
        for value in (float("nan"), float("inf"), float("-inf"), -0.0, 0.0):
            flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)] = value
    w = w.to(dtype)
    mask = nmsparse.nm_mask(w, n, m, dim) & (torch.rand(shape, generator=g) > sparse_frac)
    neg_zero = torch.full_like(w, -0.0)
    return torch.where(mask, w, torch.where(torch.rand(shape, generator=g) < 0.5, neg_zero, torch.zeros_like(w)))


def assert_restores(d: torch.Tensor, w: torch.Tensor) -> None:
    """Bit-equal at every non-zero (NaN payloads included); zero (either sign) elsewhere."""
    assert d.shape == w.shape and d.dtype == w.dtype
    iv = INT_VIEW[w.dtype]
    nz = w != 0
    assert torch.equal(d.view(iv)[nz], w.view(iv)[nz])
    assert bool((d[~nz] == 0).all())


def reference_pack(w: torch.Tensor, n: int, m: int, dim: int) -> tuple[list[float], bytes]:
    """The spec, written independently in plain Python: kept values and the LSB-first bit stream."""
    x = w.movedim(dim, -1).reshape(-1, m).double().tolist()
    b = max(1, math.ceil(math.log2(m)))
    stream, k, values = 0, 0, []
    for group in x:
        nonzero = [i for i, v in enumerate(group) if v != 0 or v != v]
        zeros = [i for i, v in enumerate(group) if i not in nonzero]
        kept = sorted(nonzero + zeros[: n - len(nonzero)])
        for p in kept:
            values.append(group[p])
            stream |= p << (k * b)
            k += 1
    return values, stream.to_bytes((k * b + 7) // 8, "little")


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3)
nm = st.integers(2, 9).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, nm=nm, dim_seed=st.integers(0, 10), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99),
       frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_round_trip_property(shape, nm, dim_seed, dtype, seed, frac):
    n, m = nm
    dim = dim_seed % len(shape)
    shape = list(shape)
    shape[dim] *= m
    w = nm_tensor(shape, n, m, dim, dtype, seed, sparse_frac=frac)
    c = compress(w, n, m, dim - len(shape) if seed % 2 else dim)  # negative dims too
    assert c.dim == dim and c.shape == tuple(shape) and c.dtype == dtype
    assert c.values.numel() == w.numel() * n // m
    assert c.index.numel() == math.ceil(w.numel() // m * n * C.index_bits(m) / 8)
    assert c.nbytes <= w.numel() * n // m * w.element_size() + w.numel() // m * n * C.index_bits(m) / 8 + 1
    assert_restores(decompress(c), w)
    ref_values, ref_index = reference_pack(w, n, m, dim)
    assert bytes(c.index.tolist()) == ref_index
    got = c.values.double().reshape(-1).tolist()
    assert all((a == b) or (a != a and b != b) for a, b in zip(got, ref_values)) and len(got) == len(ref_values)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, nm=st.sampled_from([(2, 4), (4, 8), (1, 3), (3, 5)]), dim_seed=st.integers(0, 10),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99), frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_numba_path_property(shape, nm, dim_seed, dtype, seed, frac):
    """The numba kernels (forced on small tensors; n:m limited to kernels other tests compile too)
    give the torch path's bytes and restore the tensor."""
    n, m = nm
    dim = dim_seed % len(shape)
    shape = list(shape)
    shape[dim] *= m
    w = nm_tensor(shape, n, m, dim, dtype, seed, sparse_frac=frac)
    iv = INT_VIEW[dtype]
    saved = C.KERNEL_MIN_NUMEL
    try:
        C.KERNEL_MIN_NUMEL = 1 << 62
        ref = compress(w, n, m, dim)
        C.KERNEL_MIN_NUMEL = 0
        got = compress(w, n, m, dim)
        d = decompress(got)
    finally:
        C.KERNEL_MIN_NUMEL = saved
    assert torch.equal(got.index, ref.index) and torch.equal(got.values.view(iv), ref.values.view(iv))
    assert_restores(d, w)


CASES = [(n, m, shape, dim, dtype) for n, m, shape, dim in [(2, 4, (37, 64), 1), (4, 8, (16, 9, 40), 2),
                                                            (1, 3, (12, 33), 0), (3, 5, (7, 10, 3), 1)]
         for dtype in DTYPES]
CASES.append((5, 16, (6, 64), -1, torch.float32))  # m > 8, 20 bits per group: the kernels' generic per-group path
CASES.append((13, 32, (6, 96), -1, torch.float32))  # 65 index bits per group: the kernels' per-value path


@pytest.mark.parametrize("n,m,shape,dim,dtype", CASES)
def test_numba_and_torch_paths_agree_byte_for_byte(n, m, shape, dim, dtype, monkeypatch):
    w = nm_tensor(shape, n, m, dim, dtype, seed=1)
    out = {}
    for name, threshold in (("torch", 1 << 62), ("numba", 0)):
        monkeypatch.setattr(C, "KERNEL_MIN_NUMEL", threshold)
        c = compress(w, n, m, dim)
        out[name] = (c.values.view(INT_VIEW[dtype]), c.index, decompress(c).view(INT_VIEW[dtype]))
    for a, b in zip(out["torch"], out["numba"]):
        assert torch.equal(a, b)
    assert_restores(out["numba"][2].view(dtype), w)


def test_linear_layout_for_kernels(path):
    """The layout the CPU kernel relies on: values (rows, K*n/m); row r's positions at bit r*(K*n/m)*b."""
    w = torch.tensor([[0.0, 5.0, 0.0, 6.0, 7.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0, -0.0, 0.0, 0.0, 3.0]])
    c = compress(w, 2, 4)
    assert torch.equal(c.values, torch.tensor([[5.0, 6.0, 7.0, 0.0], [1.0, 2.0, -0.0, 3.0]]))
    # positions 1,3 | 0,1 (padded with the first zero) | 0,2 | 0,3 at 2 bits each, LSB first
    stream = sum(p << (2 * k) for k, p in enumerate([1, 3, 0, 1, 0, 2, 0, 3]))
    assert c.index.tolist() == list(stream.to_bytes(2, "little")) == [0b01_00_11_01, 0b11_00_10_00]
    assert torch.equal(c.positions(), torch.tensor([[1, 3, 0, 1], [0, 2, 0, 3]]))
    assert torch.signbit(c.values[1, 2])  # a padded zero keeps its sign


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_nan_inf(dtype, path):
    w = torch.tensor([[-0.0, float("nan"), -0.0, -0.0], [float("-inf"), 0.0, -0.0, float("inf")]] * 4096,
                     dtype=dtype)
    c = compress(w, 2, 4)
    d = decompress(c)
    assert_restores(d, w)
    assert torch.isnan(d[::2, 1]).all() and torch.equal(d[1::2, [0, 3]], w[1::2, [0, 3]])


def test_more_than_n_names_first_bad_group(path):
    w = torch.zeros(3, 4, 16)
    w[2, 1, 8:12] = torch.tensor([1.0, float("nan"), 0.0, 2.0])  # NaN counts as non-zero
    w[2, 3, 0:4] = 1.0
    w[0, 0, 4:8] = torch.tensor([1.0, -0.0, -0.0, 2.0])  # -0.0 does not count
    with pytest.raises(ValueError, match=r"w\[2, 1, 8:12\] \(group 38 along dim 2\) has 3 non-zeros, more than n=2"):
        compress(w, 2, 4)
    with pytest.raises(ValueError, match=r"w\[8:12, 1, 2\] \(group 22 along dim 0\) has 3 non-zeros"):
        compress(w.permute(2, 1, 0), 2, 4, 0)  # groups of (4, 3, 16) moved-last, row-major: (1, 2, 8:12) first
    with pytest.raises(ValueError, match=r"w\[2, 3, 0:4\] \(group 44 along dim 2\) has 4 non-zeros, more than n=3"):
        compress(w, 3, 4)  # w[0, 0, 4:8] came before it: its -0.0 did not count


def test_bigger_tensor_error_on_numba_path(monkeypatch):
    w = torch.zeros(300, 64)
    w[250, 12:16] = 1.0
    w[290, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"w\[250, 12:16\] \(group 4003 along dim 1\)"):
        compress(w, 3, 4)


@pytest.mark.parametrize("args,msg", [
    (("x", 2, 4), "needs a torch.Tensor"),
    ((torch.ones(4, dtype=torch.int32), 2, 4), "floating-point"),
    ((torch.tensor(1.0), 2, 4), "scalar"),
    ((torch.zeros(4, 4), 2, 4, 2), "dim=2 is out of range"),
    ((torch.zeros(4, 6), 2, 4), "size 6 along dim 1 .* not a multiple of m=4"),
    ((torch.zeros(4, 4), 4, 4), "need 0 < n < m"),
    ((torch.zeros(4, 4), 0, 4), "need 0 < n < m"),
    ((torch.zeros(4, 4), 2.0, 4), "n must be an integer"),
])
def test_compress_input_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        compress(*args)


def test_empty_tensor(path):
    c = compress(torch.zeros(0, 8), 2, 4)
    assert c.values.shape == (0, 4) and c.index.numel() == 0
    assert decompress(c).shape == (0, 8)


def _good(shape=(64, 64), n=2, m=4):
    return compress(nm_tensor(shape, n, m, 1, torch.float32, seed=3), n, m, 1)


def test_decompress_rejects_corrupt_positions(path):
    import dataclasses

    c = _good((64, 256), 2, 4)
    idx = c.index.clone()
    idx[100] = 0b00_00_01_00  # group 200: positions 0, 1 fine; group 201: positions 0, 0: duplicate
    with pytest.raises(ValueError, match=r"group 201 .* stores positions \[0, 0\].*strictly increasing"):
        decompress(dataclasses.replace(c, index=idx))
    idx[100] = 0b01_11_11_11  # group 200: positions 3, 3
    with pytest.raises(ValueError, match=r"group 200 \(w\[3, 32:36\]\) stores positions \[3, 3\]"):
        decompress(dataclasses.replace(c, index=idx))
    c3 = compress(nm_tensor((64, 3 * 100), 1, 3, 1, torch.float32, seed=3), 1, 3)
    idx = c3.index.clone()
    idx[7] |= 0b11  # position 3 in a group of 3
    with pytest.raises(ValueError, match=r"group 28 .* stores positions \[3\].*below m=3"):
        decompress(dataclasses.replace(c3, index=idx))


@pytest.mark.parametrize("change,msg", [
    (lambda c: dict(index=c.index[:-1]), "index has 511 bytes, expected 512"),
    (lambda c: dict(index=c.index.to(torch.int16)), "index must be a 1-D torch.uint8"),
    (lambda c: dict(values=c.values[:, :-1]), r"values have shape \(64, 31\), expected \(64, 32\)"),
    (lambda c: dict(values=c.values.half()), "values must be a torch.float32 tensor"),
    (lambda c: dict(n=4), "need 0 < n < m"),
    (lambda c: dict(dim=2), "dim 2 is out of range"),
    (lambda c: dict(shape=(64, 66)), "not a multiple of m=4"),
    (lambda c: dict(dtype=torch.int8), "dtype must be one of"),
])
def test_decompress_rejects_inconsistent_fields(change, msg):
    import dataclasses

    c = _good()
    with pytest.raises(ValueError, match=msg):
        decompress(dataclasses.replace(c, **change(c)))


def test_decompress_rejects_nonzero_padding_bits():
    import dataclasses

    c = compress(torch.zeros(1, 12), 1, 4)  # 3 positions x 2 bits: the last byte's top 2 bits are padding
    idx = c.index.clone()
    idx[-1] |= 0b1100_0000
    with pytest.raises(ValueError, match="unused high bits"):
        decompress(dataclasses.replace(c, index=idx))
    with pytest.raises(ValueError, match="needs an NMCompressed"):
        decompress(torch.zeros(3))


def test_kernel_leaves_torch_thread_count_alone(run_with_one_numba_thread):
    code = ("import torch; from nmsparse.export import compress, decompress; before = torch.get_num_threads(); "
            "w = torch.zeros(512, 512); decompress(compress(w, 2, 4)); print(before, torch.get_num_threads())")
    before, after = run_with_one_numba_thread(code).split()
    assert before == after


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = nm_tensor((256, 512), 2, 4, 1, torch.float16, seed=5)
    a, b = compress(w, 2, 4), compress(w.cuda(), 2, 4)
    assert b.values.is_cuda and torch.equal(a.index, b.index.cpu())
    assert torch.equal(decompress(b).cpu().view(torch.int16), decompress(a).view(torch.int16))


def _zero_group_bits(index: torch.Tensor, g: int, n: int, m: int) -> torch.Tensor:
    """A copy of ``index`` with group ``g``'s positions all set to 0 (invalid for n >= 2)."""
    width = n * C.index_bits(m)
    stream = int.from_bytes(bytes(index.tolist()), "little") & ~(((1 << width) - 1) << (g * width))
    return torch.tensor(list(stream.to_bytes(index.numel(), "little")), dtype=torch.uint8)


@pytest.mark.parametrize("n,m,dtype", [(1, 4, torch.float16), (3, 4, torch.bfloat16), (7, 8, torch.float16),
                                       (3, 5, torch.float32)])
def test_kernels_across_chunks_and_tail(n, m, dtype, monkeypatch):
    """8199 groups: two full chunks of the kernels plus 7 groups, which leave a tail after the last
    whole unit of groups for every case here; 64-bit groups (16-bit m=4) take the word-at-a-time
    decompression. Same bytes as the torch path; corrupt groups found in chunk order."""
    import dataclasses

    w = nm_tensor((3, 2733 * m), n, m, 1, dtype, seed=7)
    iv = INT_VIEW[dtype]
    monkeypatch.setattr(C, "KERNEL_MIN_NUMEL", 1 << 62)
    ref = compress(w, n, m)
    monkeypatch.setattr(C, "KERNEL_MIN_NUMEL", 0)
    got = compress(w, n, m)
    assert torch.equal(got.index, ref.index) and torch.equal(got.values.view(iv), ref.values.view(iv))
    assert_restores(decompress(got), w)
    w[2, -m:] = 1.0  # the very last group (in the tail) has m non-zeros
    with pytest.raises(ValueError, match=rf"\(group 8198 along dim 1\) has {m} non-zeros"):
        compress(w, n, m)
    w[1, 2 * m:3 * m] = 1.0  # group 2735, in chunk 0, comes first
    with pytest.raises(ValueError, match=rf"w\[1, {2 * m}:{3 * m}\] \(group 2735 along dim 1\)"):
        compress(w, n, m)
    if n >= 2:
        idx = _zero_group_bits(got.index, 8197, n, m)
        with pytest.raises(ValueError, match=rf"group 8197 .* stores positions \[{', '.join(['0'] * n)}\]"):
            decompress(dataclasses.replace(got, index=idx))
        idx = _zero_group_bits(idx, 4100, n, m)  # chunk 1 comes first
        with pytest.raises(ValueError, match=r"group 4100 \(w\[1, "):
            decompress(dataclasses.replace(got, index=idx))
