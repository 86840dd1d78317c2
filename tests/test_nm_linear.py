"""NMLinear (packed N:M weight, numba kernel) and to_nm_linear, against F.linear on the dense weight."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmsparse
from nmsparse.kernels import NMLinear, cpu_nm, to_nm_linear

NMS = [(1, 4), (2, 4), (4, 8), (2, 8)]


@pytest.fixture(autouse=True)
def _no_timing(monkeypatch):
    """Conversions here use the fixed defaults (no timing at conversion: fast, deterministic); the
    timing itself is tested in test_nm_kernels.py."""
    monkeypatch.setenv("NMSPARSE_NM_TUNE", "0")
    monkeypatch.delenv("NMSPARSE_NM_KERNEL", raising=False)


def nm_weight(out_f: int, in_f: int, n: int, m: int, dtype=torch.float32, seed: int = 0, sparser: bool = True):
    """A random N:M weight; with ``sparser`` some groups hold fewer than n non-zeros, one row is all zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w = w * nmsparse.nm_mask(w, n, m, dim=1)
    if sparser:
        w[torch.rand(out_f, in_f, generator=g) < 0.2] = 0
        w[out_f // 2] = 0
    return w.to(dtype)


def layer(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias).to(w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.linspace(-1, 1, w.shape[0]))
    return lin


def reference(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    b = lin.bias.double() if lin.bias is not None else None
    return F.linear(x.double(), lin.weight.double(), b)


def close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype
    if dtype == torch.bfloat16:  # one rounding of the fp32 result to bf16
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", NMS)
def test_pack_unpack_exact_and_kernel_matches_linear(n, m, dtype):
    for out_f, k in ((7, 1), (13, 3), (5, 10), (3, 9)):  # in = m*k: whole and partial 16-column chunks
        w = nm_weight(out_f, m * k, n, m, dtype, seed=k)
        values, masks = cpu_nm.pack(w, n, m)
        assert values.shape == (out_f, m * k * n // m) and masks.shape == (out_f, -(-m * k // 16))
        assert torch.equal(cpu_nm.unpack(values, masks, n, m, m * k), w)
        lin = layer(w)
        mod = NMLinear.from_linear(lin, n, m, crossover=1000)
        for batch in (0, 1, 3, 17):
            x = torch.randn(batch, m * k).to(dtype)
            y = mod(x)
            assert y.shape == (batch, out_f)
            close(y, reference(x, lin), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_non_contiguous_input(dtype):
    lin = layer(nm_weight(11, 24, 2, 4, dtype))
    mod = NMLinear.from_linear(lin, 2, 4, crossover=1000)
    x = torch.randn(2, 3, 24).to(dtype)
    close(mod(x), reference(x, lin), dtype)
    assert mod(x).shape == (2, 3, 11)
    xt = torch.randn(24, 5).to(dtype).t()  # transposed: not contiguous
    strided = torch.randn(4, 48).to(dtype)[:, ::2]
    for xn in (xt, strided, torch.randn(0, 2, 24).to(dtype)):
        assert not xn.is_contiguous() or xn.numel() == 0
        close(mod(xn), reference(xn, lin), dtype)


def test_matches_finalized_layer_in_fp32_with_special_values():
    w = nm_weight(9, 32, 2, 4)
    w[1, 0], w[2, 5] = float("inf"), float("nan")
    w[3, 8] = -0.0  # a pruned negative weight after finalize: not a kept value
    lin = layer(w)
    mod = NMLinear.from_linear(lin, 2, 4)
    x = torch.randn(3, 32)
    y, ref = mod(x), lin(x)
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=1e-6, atol=1e-6)
    d = mod.dense_weight()
    assert torch.isnan(d[2, 5]) and d[1, 0] == float("inf") and d[3, 8] == 0


def test_no_bias_and_repr():
    lin = layer(nm_weight(4, 16, 2, 4), bias=False)
    mod = NMLinear.from_linear(lin, 2, 4)
    assert mod.bias is None and "n=2, m=4" in repr(mod)
    x = torch.randn(2, 16)
    close(mod(x), reference(x, lin), torch.float32)


@settings(max_examples=25, deadline=None)
@given(nm=st.sampled_from(NMS + [(3, 4), (1, 2), (5, 16)]), out_f=st.integers(1, 20), k=st.integers(1, 12),
       batch=st.integers(0, 9), seed=st.integers(0, 1000))
def test_kernel_property(nm, out_f, k, batch, seed):
    n, m = nm
    lin = layer(nm_weight(out_f, m * k, n, m, seed=seed))
    mod = NMLinear.from_linear(lin, n, m, crossover=1000)
    x = torch.randn(batch, m * k, generator=torch.Generator().manual_seed(seed))
    close(mod(x), reference(x, lin), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_and_serial_kernels_agree_bitwise(monkeypatch, dtype):
    """The thread pool path (blocks of 4 output rows over threads, the last rows % 4 one by one) and the
    calling-thread path compute every output the same way: identical bits, for every batch tile mix."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for out_f, in_f in ((4, 16), (7, 48), (13, 40), (1, 32)):
            lin = layer(nm_weight(out_f, in_f, 2, 4, dtype, seed=out_f))
            mod = NMLinear.from_linear(lin, 2, 4, crossover=1000)
            for batch in (1, 2, 3, 5, 6, 7, 9):
                x = torch.randn(batch, in_f).to(dtype)
                monkeypatch.setattr(cpu_nm, "SERIAL_WORK", 1 << 40)
                serial = mod(x)
                monkeypatch.setattr(cpu_nm, "SERIAL_WORK", 0)
                parallel = mod(x)
                assert torch.equal(serial, parallel), (out_f, in_f, batch)
                close(parallel, reference(x, lin), dtype)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cache", [True, False])
def test_fallback_above_crossover(cache):
    lin = layer(nm_weight(10, 40, 2, 4))
    mod = NMLinear.from_linear(lin, 2, 4, crossover=3, cache_dense=cache)
    for batch in (3, 4, 9):  # at the crossover: kernel; above: decompress-and-matmul
        x = torch.randn(batch, 40)
        close(mod(x), reference(x, lin), torch.float32)
        assert (mod._dense is not None) == (cache and batch > 3)
    mod.release_dense()
    assert mod._dense is None
    fresh = NMLinear.from_linear(lin, 2, 4)
    assert fresh.crossover == NMLinear.default_crossover[fresh.path].get(torch.float32, 0)
    assert NMLinear.default_crossover["avx512"][torch.float32] == 24
    mod = mod.to(torch.bfloat16)  # the cache follows the values' dtype
    xb = torch.randn(5, 40).to(torch.bfloat16)
    assert mod(xb).dtype == torch.bfloat16
    assert mod._dense is None or mod._dense[1].dtype == torch.bfloat16


def test_threads_unchanged_and_input_gradient():
    lin = layer(nm_weight(8, 16, 2, 4))
    mod = NMLinear.from_linear(lin, 2, 4, crossover=4)
    threads = torch.get_num_threads()
    for batch in (2, 6):  # kernel and fallback
        x = torch.randn(batch, 16, requires_grad=True)
        mod(x).pow(2).sum().backward()
        g = x.grad.clone()
        x.grad = None
        lin(x).pow(2).sum().backward()
        torch.testing.assert_close(g, x.grad)
    assert torch.get_num_threads() == threads
    assert all(b.grad is None for b in mod.buffers())


def test_state_dict_round_trip_and_bad_state():
    lin = layer(nm_weight(6, 32, 4, 8, torch.bfloat16))
    mod = NMLinear.from_linear(lin, 4, 8)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"values", "masks", "bias"}
    fresh = NMLinear(32, 6, 4, 8, dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    x = torch.randn(3, 32).to(torch.bfloat16)
    assert torch.equal(fresh(x), mod(x))
    bad = dict(state, masks=state["masks"].clone())
    bad["masks"][2, 1] = 0x00FF  # columns 16..23 (group 2) all set: 4 values expected
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="row 2, group 2 has 8 bits set, need exactly n=4"):
        fresh.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="values must be float32/bfloat16 of shape"):
        fresh.load_state_dict(dict(state, values=state["values"][:, :-1]))
    with pytest.raises(ValueError, match="masks must be int16 of shape"):
        fresh.load_state_dict(dict(state, masks=state["masks"].int()))
    odd = NMLinear(20, 2, 2, 4)
    s = odd.state_dict()
    s["masks"][0, 1] |= 1 << 6  # column 22 >= in_features
    with pytest.raises(ValueError, match="masks set bits past column 20"):
        odd.load_state_dict(s)


def test_from_linear_errors():
    w = nm_weight(5, 16, 2, 4, sparser=False)
    w[3, 9] = 1.0  # a third non-zero in group 2 of row 3
    with pytest.raises(ValueError, match=r"layer 'enc.fc' weight \(5, 16\) is not 2:4 along in: row 3, group 2 "
                                         r"\(columns 8..11\) has 3 non-zeros"):
        NMLinear.from_linear(layer(w), 2, 4, name="enc.fc")
    ok = layer(nm_weight(5, 16, 2, 4))
    with pytest.raises(ValueError, match="Conv1d is not an nn.Linear"):
        NMLinear.from_linear(nn.Conv1d(4, 4, 1), 2, 4)
    with pytest.raises(ValueError, match=r"m=3 is not supported by the CPU kernel"):
        NMLinear.from_linear(layer(nm_weight(2, 12, 1, 3)), 1, 3)
    with pytest.raises(ValueError, match=r"input features 18 \(weight \(2, 18\)\) is not a multiple of m=4"):
        NMLinear.from_linear(nn.Linear(18, 2), 2, 4)
    with pytest.raises(ValueError, match="weight dtype torch.float16 is not supported"):
        NMLinear.from_linear(copy.deepcopy(ok).half(), 2, 4)
    with pytest.raises(ValueError, match="need 0 < n < m"):
        NMLinear.from_linear(ok, 4, 4)
    with pytest.raises(ValueError, match="crossover must be an integer >= 0"):
        NMLinear.from_linear(ok, 2, 4, crossover=-1)
    with pytest.raises(ValueError, match="NMLinear stores float32 or bfloat16 weights"):
        NMLinear(16, 4, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="in_features must be an integer >= 0"):
        NMLinear(-4, 4, 2, 4)
    with pytest.raises(ValueError, match="in_features 6 is not a multiple of m=4"):
        NMLinear(6, 4, 2, 4)


def test_forward_errors():
    mod = NMLinear.from_linear(layer(nm_weight(5, 16, 2, 4)), 2, 4)
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 16\), got \(2, 12\)"):
        mod(torch.randn(2, 12))
    with pytest.raises(ValueError, match=r"holds torch.float32 weights but got a torch.bfloat16 input; convert the "
                                         r"input \(x.to\(torch.float32\)\) or the layer \(.to\(torch.bfloat16\)\)$"):
        mod(torch.randn(2, 16).to(torch.bfloat16))
    # float64 input: only converting the input helps (a float64 layer cannot run), so only that is suggested
    with pytest.raises(ValueError, match=r"got a torch.float64 input; convert the input \(x.to\(torch.float32\)\)$"):
        mod(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="this one holds torch.float16; convert it"):
        mod.half()(torch.randn(2, 16).half())


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8))


def test_to_nm_linear_mlp_report_and_outputs():
    model = mlp()
    nmsparse.sparsify(model, 2, 4, keep_dense=("first",))
    nmsparse.finalize(model)
    dense = copy.deepcopy(model)
    report = to_nm_linear(model, min_weights=0)
    assert [(e.name, e.converted, e.nm) for e in report.layers] == [
        ("0", False, None), ("2", True, "2:4"), ("4", True, "2:4")]
    assert report.layers[0].reason.startswith("not N:M")
    assert isinstance(model[2], NMLinear) and isinstance(model[0], nn.Linear)
    assert report.layers[1].packed_bytes == 40 * 32 * 4 + 40 * 4 * 2
    text = str(report)
    assert "packed 2:4" in text and "2 converted, 1 dense" in text
    for batch in (1, 5, 33):  # 33 rows: the fallback
        x = torch.randn(batch, 24)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


def test_to_nm_linear_detects_and_checks_patterns():
    model = mlp()
    nmsparse.sparsify(model, 4, 8, keep_dense=())
    nmsparse.finalize(model)
    auto = copy.deepcopy(model)
    rep = to_nm_linear(auto, min_weights=0)
    assert [e.nm for e in rep.layers] == ["4:8"] * 3
    given = copy.deepcopy(model)
    rep = to_nm_linear(given, 2, 4, min_weights=0)  # a 4:8 weight is (almost surely) not 2:4
    assert not any(e.converted for e in rep.layers)
    assert all(e.reason.startswith("not 2:4: row ") for e in rep.layers)
    x = torch.randn(3, 24)
    torch.testing.assert_close(auto(x), model(x), rtol=1e-5, atol=1e-6)


def test_to_nm_linear_dense_reasons():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 1)
            self.attn = nn.MultiheadAttention(8, 2)
            self.fc = nn.Linear(8, 8)
            self.fp16 = nn.Linear(8, 8).half()

    net = Net()
    nmsparse.sparsify(net, 2, 4, include="fc", keep_dense=())
    with torch.no_grad():
        for lin in (net.attn.out_proj, net.fp16):
            lin.weight.mul_(nmsparse.nm_mask(lin.weight, 2, 4))
    rep = to_nm_linear(net, 2, 4, min_weights=0)
    reasons = {e.name: e.reason for e in rep.layers}
    assert reasons["conv"] == "Conv1d is not an nn.Linear"
    assert reasons["attn.out_proj"] == "inside nn.MultiheadAttention, which reads its .weight directly"
    assert reasons["fc"].startswith("weight is still parametrized")
    assert reasons["fp16"].startswith("weight dtype torch.float16 is not supported")
    assert not rep.converted and isinstance(net.fc, nn.Linear)


def test_to_nm_linear_leaves_small_layers_dense_by_default():
    model = mlp()
    nmsparse.sparsify(model, 2, 4, keep_dense=())
    nmsparse.finalize(model)
    rep = to_nm_linear(model)  # 24x64, 64x40, 40x8: far below the default 2**22 weights
    assert not rep.converted and all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
    assert rep.layers[1].reason == (
        "2560 weights < min_weights=4194304: a weight this small sits in the CPU caches, where dense BLAS "
        "is as fast as the packed kernel (min_weights=0 converts it anyway, for the memory)")
    rep = to_nm_linear(model, min_weights=2560)  # the bound is inclusive: 64x40 converts, 24x64 does not
    assert [e.converted for e in rep.layers] == [False, True, False]
    assert rep.settings["min_weights"] == 2560
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_weights must be an integer >= 0"):
            to_nm_linear(model, min_weights=bad)


def test_to_nm_linear_errors_leave_model_unchanged():
    model = mlp()
    nmsparse.sparsify(model, 2, 4, keep_dense=())
    nmsparse.finalize(model)
    with pytest.raises(ValueError, match="give both n and m"):
        to_nm_linear(model, 2)
    with pytest.raises(ValueError, match=r"supports m in \(2, 4, 8, 16\)"):
        to_nm_linear(model, 1, 3)
    with pytest.raises(ValueError, match="crossover must be an integer"):
        to_nm_linear(model, crossover=1.5)
    assert not any(isinstance(m, NMLinear) for m in model.modules())
    root = nn.Linear(8, 4)
    with torch.no_grad():
        root.weight.mul_(nmsparse.nm_mask(root.weight, 2, 4))
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        to_nm_linear(root, min_weights=0)


def test_to_nm_linear_tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    nmsparse.prune(model, 2, 4, method="magnitude", include="encoder.*", keep_dense=())
    dense = copy.deepcopy(model)
    rep = to_nm_linear(model, min_weights=0)
    assert len(rep.converted) == 12 and {e.reason for e in rep.dense} == {
        "Embedding is not an nn.Linear",
        "not N:M: no m in (2, 4, 8, 16) dividing in_features has groups with at most 75% of m non-zero"}
    assert [e.name for e in rep.dense if e.kind == "Linear"] == ["pooler.dense"]
    with torch.no_grad():
        for x in (ids[:1, :5], ids):  # 5 rows: the kernel; 27 rows: the fallback
            torch.testing.assert_close(model(x).last_hidden_state, dense(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_layer_built_under_inference_mode_and_caches_follow_in_place_changes():
    lin = layer(nm_weight(12, 32, 2, 4))
    with torch.inference_mode():  # inference tensors keep no version counter
        mod = NMLinear.from_linear(lin, 2, 4, crossover=3)
        for batch in (2, 5):  # kernel, then the cached dense fallback
            x = torch.randn(batch, 32)
            close(mod(x), reference(x, lin), torch.float32)
    mod = NMLinear.from_linear(lin, 2, 4, crossover=3)
    x1, x5 = torch.randn(1, 32), torch.randn(5, 32)
    mod(x1), mod(x5)  # both caches built
    with torch.no_grad():
        mod.values.mul_(2)
        lin.weight.mul_(2)
    close(mod(x1), reference(x1, lin), torch.float32)
    close(mod(x5), reference(x5, lin), torch.float32)


def test_fewer_rows_than_a_block_with_input_gradient():
    lin = layer(nm_weight(3, 32, 2, 4, sparser=False))  # 3 output rows: padded to one block of 4
    mod = NMLinear.from_linear(lin, 2, 4)
    for batch in (1, 2):
        x = torch.randn(batch, 32, requires_grad=True)
        y = mod(x)
        close(y, reference(x.detach(), lin), torch.float32)
        y.sum().backward()
        torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(batch, -1))
