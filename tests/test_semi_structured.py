"""2:4 semi-structured kernels: the packing, the sparse autograd function against the masked-dense
path, sparsify(backend=...), to_semi_structured, and masks on CUDA without a host round trip.

On a CPU machine everything runs through the emulation (torch's CUTLASS packing, unpack, dense
matmul); with CUDA the same tests also run on the CUDA kernels (test ids containing "cuda"), which is
what ``make gpu-check`` selects with ``-k cuda``.
"""

import copy

import pytest
import torch
from torch import nn

import nmsparse
import nmsparse.masking.transposable as T
from nmsparse import finalize, nm_mask, sparsify, transposable_mask
from nmsparse.kernels import (CudaOps, EmulatedOps, cutlass_supported, force_emulation, ops_for, semi_structured_linear,
                              shape_problem)
from nmsparse.kernels.semi_convert import semi_structured_plan, to_semi_structured

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def sparse_24(rows, cols, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return (w * nm_mask(w, 2, 4)).to(dtype).to(device)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cutlass_packing_round_trip(dtype):
    w = sparse_24(64, 128, dtype)
    w[0, :4] = torch.tensor([0.0, -0.0, 0.0, 3.0])  # fewer than 2 non-zeros, a negative zero
    w[1, :4] = 0
    ops = EmulatedOps()
    packed, meta = ops.compress(w)
    assert packed.shape == (64, 64) and packed.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(ops.decompress((packed, meta)), w)
    x = torch.randn(5, 128).to(dtype)
    assert torch.equal(ops.linear(x, (packed, meta)), nn.functional.linear(x, w))


def test_packing_loses_a_third_non_zero():
    """The emulation really goes through the packing: a group with 3 non-zeros does not survive it,
    so a wrong mask would show up as a wrong result in the tests below."""
    w = sparse_24(32, 64)
    w[0, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    ops = EmulatedOps()
    assert not torch.equal(ops.decompress(ops.compress(w)), w)


def test_shape_problem_reads_torch_minimums():
    assert shape_problem((32, 64)) is None and shape_problem((4096, 128), torch.float16) is None
    assert "multiple of the kernels' minimum 32x64" in shape_problem((16, 64))
    assert "32x64" in shape_problem((32, 96))
    assert "float16 and bfloat16 only" in shape_problem((32, 64), torch.float32)
    assert "2-D" in shape_problem((32, 64, 1))
    with pytest.raises(ValueError, match="cannot compress.*32x64"):
        EmulatedOps().compress(torch.zeros(32, 32, dtype=torch.bfloat16))


def test_ops_selection():
    assert isinstance(ops_for("cpu"), EmulatedOps)
    assert isinstance(ops_for(torch.device("cuda", 0)), CudaOps)
    with force_emulation():
        assert isinstance(ops_for("cuda"), EmulatedOps)
    assert isinstance(ops_for("cuda"), CudaOps)
    with pytest.raises(ValueError, match="CudaOps needs CUDA tensors"):
        CudaOps().compress(sparse_24(32, 64))
    with pytest.raises(ValueError, match="backend must be"):
        CudaOps("cusparse")


# ----------------------------------------------------------------------------- autograd function


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def make_pair(device, method, transposable, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    dense = MLP().to(device, dtype)
    semi = copy.deepcopy(dense)
    kw = dict(method=method, decay=0.5, keep_dense=(), transposable=transposable, **kw)
    sparsify(dense, 2, 4, **kw)
    report = sparsify(semi, 2, 4, backend="semi-structured", **kw)
    return dense, semi, report


@pytest.fixture
def compress_calls(monkeypatch):
    calls = []
    for cls in (EmulatedOps, CudaOps):
        orig = cls.compress

        def counted(self, a, _orig=orig):
            calls.append(tuple(a.shape))
            return _orig(self, a)

        monkeypatch.setattr(cls, "compress", counted)
    return calls


def run(model, x, autocast_dtype):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=x.device)).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return y, x.grad, grads


def close(a, b, tol=1e-2):
    """Relative error in norm: bf16 matmuls that add in another order differ in the last bits, and
    those differences grow through a network; a wrong gradient rule or packing is far above 1%."""
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape
    err = float((a - b).norm() / b.norm().clamp_min(1e-12))
    assert err < tol, f"relative error {err:.3g} >= {tol}"


# (weight dtype, autocast dtype): fp32 master weights under autocast, a half model, and fp32 (dense);
# every method with and without transposable masks under bf16 autocast, a spread of them otherwise
CASES = [(method, tr, torch.float32, torch.bfloat16) for method in ("ste", "srste", "fixed") for tr in (True, False)]
CASES += [("srste", True, torch.float32, torch.float16), ("fixed", False, torch.float32, torch.float16),
          ("ste", True, torch.bfloat16, None), ("srste", False, torch.bfloat16, None),
          ("srste", True, torch.float32, None), ("fixed", False, torch.float32, None)]


def case_id(c):
    method, tr, wdtype, adtype = c
    prec = {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast", None: str(wdtype)[6:]}[adtype]
    return f"{method}-{'transposable' if tr else 'plain'}-{prec}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,transposable,wdtype,adtype", CASES, ids=[case_id(c) for c in CASES])
def test_matches_masked_dense(device, method, transposable, wdtype, adtype, compress_calls):
    dense, semi, _ = make_pair(device, method, transposable, wdtype)
    x = torch.randn(3, 5, 64, device=device, dtype=wdtype if adtype is None else torch.float32)
    yd, dxd, gd = run(dense, x, adtype)
    assert not compress_calls
    ys, dxs, gs = run(semi, x, adtype)
    if wdtype == torch.float32 and adtype is None:
        assert not compress_calls  # no fp32 2:4 kernel: exactly the masked-dense path
        assert torch.equal(yd, ys) and torch.equal(dxd, dxs)
    else:
        # forward: both layers' E*W; backward: their transposes when the masks are transposable
        fwd = [(128, 64), (64, 128)]  # up's E*W, then down's
        bwd = [(128, 64), (64, 128)]  # down's (E*W)^T, then up's
        assert compress_calls == fwd + (bwd if transposable else [])
    assert ys.dtype == yd.dtype and dxs.dtype == dxd.dtype == x.dtype
    close(ys, yd)
    close(dxs, dxd)
    assert gd.keys() == gs.keys()
    for k in gd:
        assert gs[k].dtype == gd[k].dtype
        close(gs[k], gd[k])
    for name, mod in (("up", semi.up), ("down", semi.down)):
        mask = mod.parametrizations.weight[0].mask
        g = gs[f"{name}.parametrizations.weight.original"]
        if method == "fixed":
            assert not g[~mask].any()
        elif method == "srste":  # the SR-STE term, exactly as the dense path adds it
            assert torch.equal(g[~mask], gd[f"{name}.parametrizations.weight.original"][~mask])


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_follow_the_dense_path(device):
    """Masks refresh on schedule (update_every) and a few SGD steps stay with the masked-dense run."""
    dense, semi, _ = make_pair(device, "srste", True, update_every=2)
    x = torch.randn(8, 64, device=device)
    for model in (dense, semi):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(nmsparse.masks(dense).values(), nmsparse.masks(semi).values()):
        assert (a != b).float().mean() < 0.02  # bf16 rounding may flip a near-tie
    assert int(semi.up.parametrizations.weight[0].step) == 3
    for p, q in zip(dense.parameters(), semi.parameters()):
        close(p, q)


@pytest.mark.parametrize("batch", [5, 16])  # 5: torch pads the dense operand to its minimum
def test_cuda_route_on_cpu_with_emulated_matmuls(monkeypatch, batch):
    """CudaOps' route on the CPU: the CUTLASS tensor subclass, F.linear's dispatch through its
    transposes, bias and padding, inside the autograd function, with only torch's two CUTLASS matmul
    ops replaced by unpack-and-matmul (the real ones need a GPU)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass as unpack

    import nmsparse.kernels.semi_structured_autograd as L

    kernel_calls = []

    def mm(p, m, d, **k):
        kernel_calls.append(("mm", tuple(d.shape)))
        return unpack(p, m) @ d

    def addmm(b, p, m, d, **k):
        kernel_calls.append(("addmm", tuple(d.shape)))
        return unpack(p, m) @ d + b[:, None]

    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", mm)
    monkeypatch.setattr(torch, "_sparse_semi_structured_addmm", addmm)
    monkeypatch.setattr(Cutlass, "_validate_device_dim_dtype_shape", classmethod(lambda cls, t: None))

    class CpuCudaOps(CudaOps):
        def compress(self, a):
            return Cutlass.from_dense(a.contiguous())

    used = []
    monkeypatch.setattr(L, "ops_for", lambda device: used.append(device) or CpuCudaOps("cutlass"))
    dense, semi, _ = make_pair("cpu", "srste", True)
    x = torch.randn(batch, 64)
    yd, dxd, gd = run(dense, x, torch.bfloat16)
    ys, dxs, gs = run(semi, x, torch.bfloat16)
    assert len(used) == 4  # forward: 2 layers; backward: 2 transposed
    padded = -(-batch // 8) * 8  # the dense operand is padded to a multiple of 8 rows
    assert kernel_calls == [("addmm", (64, padded)), ("mm", (128, padded)),  # up (bias), down (no bias)
                            ("mm", (64, padded)), ("mm", (128, padded))]  # dy @ (E*W): down, then up
    close(ys, yd)
    close(dxs, dxd)
    for k in gd:
        close(gs[k], gd[k])


def test_functional_checks_method():
    w = torch.randn(32, 64)
    with pytest.raises(ValueError, match="method must be one of"):
        semi_structured_linear(torch.randn(2, 64), w, nm_mask(w, 2, 4), method="sr-ste")


# ----------------------------------------------------------------------------- sparsify / finalize


def test_sparsify_backend_errors_leave_model_unchanged():
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="backend must be one of \\('dense', 'semi-structured'\\)"):
        sparsify(model, 2, 4, backend="cusparselt")
    with pytest.raises(ValueError, match="needs n=2, m=4.*got n=4, m=8"):
        sparsify(model, 4, 8, backend="semi-structured")
    with pytest.raises(ValueError, match="needs n=2, m=4.*got n=1, m=4"):
        sparsify(model, 1, 4, backend="semi-structured")
    assert not list(nmsparse.sparse_layers(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "forward" not in model.up.__dict__


def test_report_says_what_runs_sparse():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32), nn.Linear(32, 64), nn.Conv1d(8, 8, 1))
    rep = sparsify(model, 2, 4, keep_dense=(), transposable=True, backend="semi-structured")
    notes = rep.settings["backend_layers"]
    assert rep.settings["backend"] == "semi-structured"
    assert notes["0.weight"].startswith("semi-structured forward, input gradient sparse")
    assert "input gradient dense (transposed weight shape 128x32 is not a multiple" in notes["1.weight"]
    assert notes["2.weight"] == "masked dense: weight shape 64x32 is not a multiple of the kernels' minimum 32x64"
    assert notes["3.weight"] == "masked dense: Conv1d has no semi-structured kernel (Linear only)"
    assert "forward" in model[0].__dict__ and "forward" not in model[2].__dict__
    rep = sparsify(nn.Sequential(nn.Linear(64, 128)), 2, 4, keep_dense=(), backend="semi-structured")
    assert "input gradient dense (mask not transposable; use transposable=True)" in rep.settings["backend_layers"]["0.weight"]
    assert "backend" not in sparsify(nn.Sequential(nn.Linear(64, 128)), 2, 4, keep_dense=()).settings


def test_finalize_removes_the_sparse_forward_and_deepcopy_keeps_it_separate():
    _, semi, _ = make_pair("cpu", "ste", True)
    twin = copy.deepcopy(semi)
    assert twin.up.forward.module is twin.up and semi.up.forward.module is semi.up
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = semi(x)
    finalize(semi)
    assert "forward" not in semi.up.__dict__ and type(semi.up) is nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        close(semi(x), before)
    assert "forward" in twin.up.__dict__  # finalizing a copy leaves the original alone


# ----------------------------------------------------------------------------- to_semi_structured


def finalized_bf16_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 10))
    sparsify(model, 2, 4, keep_dense=("last",))
    with torch.no_grad():
        for _ in range(2):
            model.train()(torch.randn(4, 64))
    return finalize(model).to(torch.bfloat16)


def test_what_we_hand_to_torch_unpacks_to_the_finalized_weight():
    model = finalized_bf16_model()
    entries = {e.name: e for e in semi_structured_plan(model, need_cuda=False)}
    assert [e.name for e in entries.values() if e.sparse] == ["0", "2"]
    assert entries["3"].reason == "shape 10x64 is not a multiple of the kernels' minimum 32x64"
    ops = EmulatedOps()
    for name in ("0", "2"):
        w = model.get_submodule(name).weight.detach()
        assert (w.view(torch.int16) == torch.tensor(-0.0, dtype=torch.bfloat16).view(torch.int16)).any()
        assert torch.equal(ops.decompress(ops.compress(w)), w)


def test_plan_reasons():
    model = finalized_bf16_model()
    model[0].float()
    with torch.no_grad():
        model[2].weight[0, :4] = 1.0
    entries = {e.name: e for e in semi_structured_plan(model, need_cuda=False)}
    assert "float16 and bfloat16 only" in entries["0"].reason and "model.bfloat16()" in entries["0"].reason
    assert entries["2"].reason == "weight is not 2:4 along its input features (not a finalized 2:4 layer)"
    assert semi_structured_plan(model)[0].reason == "weight on cpu: move the model to CUDA first"
    sparsify(model, 2, 4, keep_dense=())
    with pytest.raises(ValueError, match="call nmsparse.finalize"):
        semi_structured_plan(model, need_cuda=False)


@pytest.mark.skipif(CUDA, reason="checks the error without CUDA")
def test_to_semi_structured_needs_cuda():
    model = finalized_bf16_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="to_semi_structured needs CUDA"):
        to_semi_structured(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def cuda_backends():
    """The CUDA back ends this GPU runs (CUTLASS: compute capability 8.x only)."""
    if not CUDA:
        return []
    cslt = torch.backends.cusparselt.is_available()
    return (["cusparselt"] if cslt else []) + (["cutlass"] if cutlass_supported() else [])


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "cusparselt", "cutlass"])
def test_to_semi_structured_cuda(backend):
    if backend != "auto" and backend not in cuda_backends():
        pytest.skip(f"{backend} does not run on this GPU")
    model = finalized_bf16_model().cuda()
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        rep = to_semi_structured(model, backend=backend)
        assert [e.name for e in rep.sparse] == ["0", "2"]
        assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
        close(model(x), ref)


@needs_cuda
def test_cuda_ops_round_trip_and_matmul():
    w = sparse_24(128, 256, device="cuda")
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    assert cuda_backends(), "neither cuSPARSELt nor CUTLASS 2:4 kernels run on this GPU"
    for backend in cuda_backends():
        ops = CudaOps(backend)
        h = ops.compress(w)
        assert torch.equal(ops.decompress(h), w)
        close(ops.linear(x, h, b), nn.functional.linear(x, w, b))
    if not cutlass_supported():
        with pytest.raises(RuntimeError, match="compute capability 8.x only"):
            CudaOps("cutlass").compress(w)


# ----------------------------------------------------------------------------- masks on CUDA


def test_exhaustive_24_equals_the_optimal_solver():
    torch.manual_seed(3)
    w = torch.randn(64, 128)
    assert torch.equal(T._optimal_24(w.unsqueeze(0))[0], transposable_mask(w, 2, 4, "optimal"))
    ties = torch.randint(-2, 3, (3, 32, 64)).float()  # many ties: same optimum, maybe another mask
    ties[0, :8, :8] = 0.0
    ties[1, 4, 5], ties[2, 9, 9] = float("nan"), float("-inf")
    ex = T._optimal_24(ties)
    ref = torch.stack([transposable_mask(t, 2, 4, "optimal") for t in ties])
    assert torch.equal(ex[0, :8, :8], ref[0, :8, :8])  # zero tiles: the solver's own pattern

    def tile_sums(mask):
        return (T._tiles_of(ties, 4) * T._tiles_of(mask.float(), 4)).sum((1, 2))

    assert torch.equal(tile_sums(ex), tile_sums(ref))
    assert all(T.is_transposable_nm(e, 2, 4) and int(e.sum()) == e.numel() // 2 for e in ex)


@needs_cuda
def test_cuda_masks_do_not_bounce_through_the_cpu(monkeypatch):
    w = torch.randn(256, 512, device="cuda")
    ref = {k: f(w.cpu()) for k, f in (("nm", lambda t: nm_mask(t, 2, 4)),
                                      ("opt", lambda t: transposable_mask(t, 2, 4, "optimal")))}

    def boom(*a, **k):
        raise AssertionError("a CUDA mask went through host memory")

    for name in ("cpu", "numpy", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    nm = nm_mask(w, 2, 4)
    opt = transposable_mask(w, 2, 4, "optimal")
    approx = transposable_mask(w, 2, 4, "approx")
    monkeypatch.undo()
    assert nm.is_cuda and opt.is_cuda and approx.is_cuda
    assert torch.equal(nm.cpu(), ref["nm"]) and torch.equal(opt.cpu(), ref["opt"])
