"""Every N:M kernel path the host can run (AVX-512, AVX2+FMA, dense fallback) against a dense reference;
the per-CPU selection with faked CPUs; the timed crossovers; torch.compile / torch.export of converted models."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmsparse
from nmsparse.kernels import NMLinear, cpu_nm, cpu_select, to_nm_linear
from nmsparse.kernels import tune as tuning

HOST = cpu_select.host_cpu()
HAS = {p: all(not cpu_select.missing(p, dt, HOST) for dt in cpu_nm.KERNEL_DTYPES) for p in ("avx512", "avx2")}
RUNNABLE = [p for p in ("avx512", "avx2") if HAS[p]] + ["dense"]
ALL_NM = [(n, m) for m in (2, 4, 8) for n in range(1, m)]

NEEDS_KERNEL = pytest.mark.skipif(RUNNABLE == ["dense"], reason="this CPU has no N:M kernel")

ZNVER3 = cpu_select.CpuInfo("znver3", frozenset({"avx", "avx2", "fma", "f16c", "bmi2"}))
SKX = cpu_select.CpuInfo("skylake-avx512", frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"}))
ICX = cpu_select.CpuInfo("icelake-server", SKX.features | {"avx512vbmi2"})
ARM = cpu_select.CpuInfo("neoverse-v1", frozenset({"neon", "sve"}))


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    monkeypatch.setenv("NMSPARSE_NM_TUNE", "0")
    monkeypatch.delenv("NMSPARSE_NM_KERNEL", raising=False)


def nm_weight(out_f, in_f, n, m, dtype=torch.float32, seed=0, special=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w = w * nmsparse.nm_mask(w, n, m, dim=1)
    w[torch.rand(out_f, in_f, generator=g) < 0.15] = 0  # groups with fewer than n non-zeros (padding)
    if special and out_f > 2:
        for r, val in ((0, float("inf")), (1, float("nan")), (2, float("-inf"))):
            nz = (w[r] != 0).nonzero()[:, 0]
            if len(nz):
                w[r, nz[-1]] = val
    return w.to(dtype)


def reference(x, w, bias=None):
    return F.linear(x.double(), w.double(), None if bias is None else bias.double())


def check(y, ref, dtype):
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, equal_nan=True, **tol)


@pytest.mark.parametrize("path", RUNNABLE)
@pytest.mark.parametrize("dtype", cpu_nm.KERNEL_DTYPES)
def test_every_path_every_m_matches_dense(path, dtype):
    """Every n:m with m in 2, 4, 8; odd shapes (partial 16-column chunks, fewer rows than a block);
    NaN and inf weights; batch tiles 1-4 and the remainder; the dense fallback decompresses portably."""
    for i, (n, m) in enumerate(ALL_NM):
        for out_f, in_f in ((3, m * 3), (13, 40 if 40 % m == 0 else 8 * m), (9, 16)):
            w = nm_weight(out_f, in_f, n, m, dtype, seed=i, special=True)
            lin = nn.Linear(in_f, out_f).to(dtype)
            lin.weight.data = w
            mod = NMLinear.from_linear(lin, n, m, crossover=1000, kernel=path)
            assert mod.path == path
            for batch in (0, 1, 2, 3, 4, 7):
                x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(batch)).to(dtype)
                check(mod(x), reference(x, w, lin.bias.detach()), dtype)
            torch.testing.assert_close(cpu_nm.unpack(mod.values, mod.masks, n, m, in_f, expand=False), w,
                                       rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not HAS["avx2"], reason="the host cannot run AVX2 code")
@settings(max_examples=20, deadline=None)
@given(nm=st.sampled_from(ALL_NM), out_f=st.integers(1, 21), k=st.integers(1, 9), batch=st.integers(1, 9),
       seed=st.integers(0, 10_000), bf16=st.booleans())
def test_avx2_kernel_property(nm, out_f, k, batch, seed, bf16):
    n, m = nm
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = nm_weight(out_f, m * k, n, m, dtype, seed=seed)
    values, masks = cpu_nm.pack(w, n, m)
    x = torch.randn(batch, m * k, generator=torch.Generator().manual_seed(seed))
    y = cpu_nm.nm_matmul(x, values, masks, n, m, m * k, path="avx2")
    torch.testing.assert_close(y.double(), reference(x, w.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS["avx2"], reason="the host cannot run AVX2 code")
def test_avx2_serial_and_parallel_agree_bitwise(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = nm_weight(30, 64, 2, 4)
        values, masks = cpu_nm.pack(w, 2, 4)
        for batch in (1, 5, 8):
            x = torch.randn(batch, 64)
            monkeypatch.setattr(cpu_nm, "SERIAL_WORK", 1 << 40)
            serial = cpu_nm.nm_matmul(x, values, masks, 2, 4, 64, path="avx2")
            monkeypatch.setattr(cpu_nm, "SERIAL_WORK", 0)
            assert torch.equal(serial, cpu_nm.nm_matmul(x, values, masks, 2, 4, 64, path="avx2"))
    finally:
        torch.set_num_threads(threads)


def test_infinite_input_gives_nan_like_dense():
    """0 * inf is NaN in dense F.linear; the kernels multiply pruned lanes too, so they agree."""
    w = nm_weight(8, 32, 2, 4)
    x = torch.randn(2, 32)
    x[0, (w[0] == 0).nonzero()[0, 0]] = float("inf")
    ref = F.linear(x, w)
    for path in RUNNABLE:
        lin = nn.Linear(32, 8, bias=False)
        lin.weight.data = w
        y = NMLinear.from_linear(lin, 2, 4, crossover=100, kernel=path)(x)
        torch.testing.assert_close(y, ref, equal_nan=True, rtol=1e-5, atol=1e-5)
        assert torch.isnan(y[0, 0])


def test_selection_with_faked_cpus():
    assert cpu_select.choose(4, torch.float32, cpu=ZNVER3) == cpu_select.Choice("avx2")
    assert cpu_select.choose(8, torch.bfloat16, cpu=ZNVER3).path == "avx2"
    no16 = cpu_select.choose(16, torch.float32, cpu=ZNVER3)
    assert no16.path == "dense" and no16.reason == (
        "no N:M kernel for this CPU (znver3, AVX2+FMA; avx512: no avx512f; avx2: m=16 not in (2, 4, 8))")
    assert cpu_select.choose(4, torch.float32, cpu=SKX).path == "avx512"
    assert cpu_select.choose(4, torch.bfloat16, cpu=SKX).path == "avx2"  # vpexpandw needs AVX512-VBMI2
    assert cpu_select.choose(4, torch.bfloat16, cpu=ICX).path == "avx512"
    assert cpu_select.choose(16, torch.bfloat16, cpu=SKX).path == "dense"
    arm = cpu_select.choose(4, torch.float32, cpu=ARM)
    assert arm.reason == ("no N:M kernel for this CPU (neoverse-v1, no AVX2+FMA; avx512: no avx512f; "
                          "avx2: no avx2/fma)")
    assert cpu_select.choose(4, torch.float32, "avx2", cpu=ICX).path == "avx2"
    assert cpu_select.choose(4, torch.float32, "dense", cpu=ICX).reason == "dense forced (kernel='dense')"
    with pytest.raises(ValueError, match=r"the avx512 N:M kernel needs avx512f, which this CPU \(znver3\) lacks"):
        cpu_select.choose(4, torch.float32, "avx512", cpu=ZNVER3)
    with pytest.raises(ValueError, match=r"the avx2 N:M kernel takes m in \(2, 4, 8\), got m=16"):
        cpu_select.choose(16, torch.float32, "avx2", cpu=ICX)
    with pytest.raises(ValueError, match="kernel must be one of auto, avx512, avx2, dense; got 'sse'"):
        cpu_select.choose(4, torch.float32, "sse", cpu=ICX)
    assert cpu_select.parse_features("+avx2,-avx512f,+fma") == {"avx2", "fma"}
    assert (ZNVER3.isa(), SKX.isa(), ARM.isa()) == ("AVX2+FMA", "AVX-512", "no AVX2+FMA")


def test_environment_override(monkeypatch):
    monkeypatch.setenv("NMSPARSE_NM_KERNEL", "dense")
    assert cpu_select.choose(4, torch.float32, cpu=ICX).reason == "dense forced (NMSPARSE_NM_KERNEL='dense')"
    assert cpu_select.choose(4, torch.float32, "auto", cpu=ICX).path == "avx512"  # the argument wins
    monkeypatch.setenv("NMSPARSE_NM_KERNEL", "fast")
    with pytest.raises(ValueError, match="NMSPARSE_NM_KERNEL must be one of auto, avx512, avx2, dense; got 'fast'"):
        cpu_select.choose(4, torch.float32, cpu=ICX)


def pruned_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    for lin in model[::2]:
        with torch.no_grad():
            lin.weight.mul_(nmsparse.nm_mask(lin.weight, 2, 4))
    return model.to(dtype)


def test_cpu_without_kernel_leaves_layers_dense_and_nmlinear_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_select, "host_cpu", lambda: ARM)
    model = pruned_mlp()
    ref = copy.deepcopy(model)
    rep = to_nm_linear(model, min_weights=0)
    assert not rep.converted and all(isinstance(m, nn.Linear) for m in model[::2])
    assert {e.reason for e in rep.layers} == {
        "no N:M kernel for this CPU (neoverse-v1, no AVX2+FMA; avx512: no avx512f; avx2: no avx2/fma)"}
    assert rep.settings["cpu"] == "neoverse-v1"
    lin = ref[2]
    mod = NMLinear.from_linear(lin, 2, 4)  # built directly (or loaded): runs the dense fallback at every batch
    assert mod.path == "dense" and mod.crossover == 0 and "kernel=dense" in repr(mod)
    x = torch.randn(1, 64)
    torch.testing.assert_close(mod(x), lin(x))
    assert mod._dense is not None
    with pytest.raises(ValueError, match=r"the avx2 N:M kernel needs avx2, fma, which this CPU \(neoverse-v1\) lacks"):
        to_nm_linear(copy.deepcopy(ref), kernel="avx2", min_weights=0)


def test_to_nm_linear_reports_kernel_and_crossover(monkeypatch):
    monkeypatch.setattr(cpu_select, "host_cpu", lambda: ZNVER3)
    model = pruned_mlp()
    ref = copy.deepcopy(model)
    rep = to_nm_linear(model, min_weights=0)
    assert [(e.kernel, e.crossover) for e in rep.converted] == [("avx2", 8)] * 3
    assert "packed 2:4, avx2 kernel up to 8 rows, dense F.linear above" in str(rep)
    assert rep.settings["isa"] == "AVX2+FMA" and rep.settings["tune"] is False
    x = torch.randn(5, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    rep = to_nm_linear(copy.deepcopy(ref), kernel="dense", min_weights=0)
    assert not rep.converted and rep.layers[0].reason == "dense forced (kernel='dense')"
    rep = to_nm_linear(copy.deepcopy(ref).to(torch.bfloat16), min_weights=0)  # avx2 bf16: default crossover 0
    assert not rep.converted and rep.layers[0].reason == (
        "the avx2 kernel's default crossover for torch.bfloat16 is 0 (slower than dense at batch 1 where "
        "measured); tune=True times it on this CPU, crossover= forces it")
    rep = to_nm_linear(copy.deepcopy(ref).to(torch.bfloat16), min_weights=0, crossover=3)
    assert [e.crossover for e in rep.converted] == [3, 3, 3]


class FakeTimer:
    """dense takes 1.0 per call; the kernel ``speed[batch]`` times faster (missing batches: 0.5x)."""

    def __init__(self, speed):
        self.speed, self.calls = speed, []

    def __call__(self, kind, batch, fn):
        self.calls.append((kind, batch))
        return 1.0 if kind == "dense" else 1.0 / self.speed.get(batch, 0.5)


@NEEDS_KERNEL
def test_measured_crossover_with_a_fake_timer(monkeypatch):
    tuning.clear_cache()
    model = pruned_mlp()
    lin = model[2]
    mod = NMLinear.from_linear(lin, 2, 4)
    timer = FakeTimer({1: 1.8, 2: 1.6, 4: 1.3, 8: 1.1, 16: 1.02})
    meas = tuning.measure(lin.weight.detach(), mod, timer=timer, use_cache=False)
    assert meas.crossover == 8 and list(meas.ratios) == [1, 2, 4, 8, 16]  # 1.02 < MARGIN: stop at 16
    assert {k for k, _ in timer.calls} == {"dense", "kernel"}
    assert sum(1 for k, b in timer.calls if k == "kernel" and b == 16) == 2 * 5  # a loss is timed twice
    lose = tuning.measure(lin.weight.detach(), mod, timer=FakeTimer({}), use_cache=False)
    assert lose.crossover == 0 and lose.ratios == {1: 0.5}
    reason = tuning.dense_reason((48, 64), torch.float32, "avx2", lose)
    assert reason == (f"dense is faster for 48x64 fp32 on this CPU ({HOST.name}): the avx2 kernel ran at batch 1 "
                      "0.50x dense speed when measured at conversion (needs 1.05x at batch 1)")
    # to_nm_linear(tune=True): one measurement per distinct shape (cached), per-layer outcome in the report
    speeds = {(64, 32): {1: 2.0, 2: 2.0, 4: 1.5}, (48, 64): {}, (16, 48): {1: 1.2}}
    monkeypatch.setattr(tuning, "wall_timer", lambda kind, b, fn: FakeTimer(speeds[current[0]])(kind, b, fn))
    real_measure = tuning.measure
    current = [None]

    def spy(weight, layer, **kw):
        current[0] = tuple(weight.shape)
        return real_measure(weight, layer, **kw)

    monkeypatch.setattr(tuning, "measure", spy)
    ref = copy.deepcopy(model)
    rep = to_nm_linear(model, tune=True)
    assert rep.settings["min_weights"] == 0 and rep.settings["crossover"] == "measured"
    assert [(e.converted, e.crossover) for e in rep.layers] == [(True, 4), (False, None), (True, 1)]
    assert rep.layers[0].measured == {1: 2.0, 2: 2.0, 4: 1.5, 8: 0.5}
    assert rep.layers[1].reason.startswith("dense is faster for 48x64 fp32 on this CPU")
    assert "kernel up to 4 rows (measured)" in str(rep)
    assert model[0].crossover == 4 and model[4].crossover == 1
    x = torch.randn(3, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    tuning.clear_cache()


@NEEDS_KERNEL
def test_real_timing_is_cheap_and_cached():
    tuning.clear_cache()
    lin = pruned_mlp()[2]
    mod = NMLinear.from_linear(lin, 2, 4)
    meas = tuning.measure(lin.weight.detach(), mod, ladder=(1, 2))
    assert set(meas.ratios) <= {1, 2} and meas.crossover in (0, 1, 2) and all(r > 0 for r in meas.ratios.values())
    assert tuning.measure(lin.weight.detach(), mod) is meas  # cached per CPU, kernel, shape, dtype, threads
    tuning.clear_cache()


@NEEDS_KERNEL
@pytest.mark.parametrize("dtype", cpu_nm.KERNEL_DTYPES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_torch_compile_equals_eager(dtype, mode):
    model = pruned_mlp(dtype)
    to_nm_linear(model, min_weights=0, crossover=8)  # explicit: AVX2 bf16 would stay dense by default
    assert all(isinstance(m, NMLinear) for m in model[::2])
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    torch._dynamo.reset()
    with ctx():
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: no graph break inside the layers
        for batch in (2, 30):  # the kernel, then the dense fallback above the crossover
            x = torch.randn(batch, 32).to(dtype)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@NEEDS_KERNEL
def test_torch_compile_backward_and_export():
    model = pruned_mlp()
    to_nm_linear(model, min_weights=0)
    x = torch.randn(3, 32)
    torch._dynamo.reset()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(model)(xc).square().sum().backward()
    model(xe).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(model, (x,))
    assert "torch.ops.nmsparse.nm_linear.default" in ep.graph_module.code
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))


def test_exported_path_this_cpu_lacks_is_replaced(monkeypatch):
    """A graph exported on an AVX-512 machine names that kernel; elsewhere the op runs what the CPU has."""
    w = nm_weight(8, 32, 2, 4)
    values, masks = cpu_nm.pack(w, 2, 4)
    x = torch.randn(2, 32)
    monkeypatch.setattr(cpu_select, "host_cpu", lambda: ARM)
    y = torch.ops.nmsparse.nm_linear(x, values, masks, None, 2, 4, 32, "avx512")
    torch.testing.assert_close(y, F.linear(x, w))


HASWELL_SCRIPT = r"""
import torch, nmsparse
from nmsparse.kernels import NMLinear, cpu_nm, cpu_select, cpu_nm_avx2, to_nm_linear
cpu = cpu_select.host_cpu()
assert cpu.name == "haswell" and "avx512f" not in cpu.features, cpu
assert cpu_select.choose(4, torch.float32).path == "avx2"
for dtype in (torch.float32, torch.bfloat16):
    for n, m in ((2, 4), (4, 8), (1, 2), (3, 8)):
        w = torch.randn(13, 48)
        w = (w * nmsparse.nm_mask(w, n, m)).to(dtype)
        w[0, (w[0] != 0).nonzero()[0, 0]] = float("nan")
        lin = torch.nn.Linear(48, 13, bias=False).to(dtype)
        lin.weight.data = w
        mod = NMLinear.from_linear(lin, n, m, crossover=100)
        assert mod.path == "avx2"
        for b in (1, 3, 6):
            x = torch.randn(b, 48).to(dtype)
            ref = torch.nn.functional.linear(x.double(), w.double())
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(mod(x).double(), ref, rtol=tol, atol=tol, equal_nan=True)
asm = "".join(cpu_nm_avx2.drivers(2, 4)[0].inspect_asm().values())
assert "vpermps" in asm and "zmm" not in asm and "vexpand" not in asm
print("haswell ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS["avx2"] or sys.platform != "linux", reason="needs a CPU that runs AVX2 code")
def test_avx2_kernel_compiled_for_haswell_in_a_subprocess():
    """numba compiles everything for haswell (no AVX-512 anywhere): the AVX2 machine's code, run here."""
    env = {**os.environ, **cpu_select.haswell_env(dense_too=False), "NMSPARSE_NM_TUNE": "0"}
    env.pop("NMSPARSE_NM_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", HASWELL_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "haswell ok" in out.stdout


def reference_pack(w: torch.Tensor, n: int, m: int):
    """Brute force: per row and group, the non-zeros, then zeros at the lowest unused columns up to n."""
    out_f, in_f = w.shape
    values = torch.zeros(out_f, in_f * n // m, dtype=w.dtype)
    masks = torch.zeros(out_f, -(-in_f // 16), dtype=torch.int32)
    for r in range(out_f):
        k = 0
        for g in range(in_f // m):
            cols = list(range(g * m, g * m + m))
            nz = [c for c in cols if bool(w[r, c] != 0)]
            keep = sorted(nz + [c for c in cols if c not in nz][: n - len(nz)])
            for c in keep:
                values[r, k] = w[r, c] if c in nz else 0
                masks[r, c // 16] |= 1 << (c % 16)
                k += 1
    return values, torch.where(masks >= 1 << 15, masks - (1 << 16), masks).to(torch.int16)


@pytest.mark.parametrize("dtype", cpu_nm.KERNEL_DTYPES)
def test_pack_matches_brute_force_and_refuses_dense_groups(dtype):
    for n, m, in_f in ((2, 4, 20), (3, 8, 24), (1, 2, 34), (5, 16, 32)):
        w = nm_weight(5, in_f, n, m, dtype, seed=in_f, special=True)
        w[4, 1] = -0.0 if w[4, 1] == 0 else w[4, 1]  # -0.0: not a kept value
        values, masks = cpu_nm.pack(w, n, m)
        ref_v, ref_m = reference_pack(w, n, m)
        assert torch.equal(masks, ref_m)
        assert torch.equal(values.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref_v.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    w = nm_weight(4, 16, 2, 4, dtype)
    w[2, 4:8] = 1.0
    with pytest.raises(ValueError, match=r"weight \(4, 16\) is not 2:4 along in: row 2, group 1 \(columns 4..7\) "
                                         "has 4 non-zeros"):
        cpu_nm.pack(w, 2, 4)
