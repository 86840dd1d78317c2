"""A CUDA training step must never wait for the GPU on the host: no ``.item()`` / ``int()`` /
``bool()`` of a device tensor, no data-dependent shapes (``nonzero``, boolean indexing), no
``torch.equal``, no copy to host memory. Each of those would stall the CPU until the GPU catches up,
once per layer per pass.

Without a GPU this is checked on the CPU, on the code paths a CUDA tensor takes (the torch mask
paths, the exact 2:4 transposable masks of ``transposable._optimal_24``, the semi-structured
emulation): :func:`no_host_sync` runs a block under a ``TorchDispatchMode`` that raises on every
aten op that synchronises on CUDA (``aten._local_scalar_dense`` is what ``.item()``, ``int()``,
``float()`` and ``bool()`` call) and a ``TorchFunctionMode`` that raises on ``.tolist()``,
``.numpy()`` and ``.cpu()``. With CUDA, the same steps also run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import nmsparse
from nmsparse.masking import nm as nmmasks
from nmsparse.masking import transposable as T

CUDA = torch.cuda.is_available()
aten = torch.ops.aten


class HostSync(AssertionError):
    pass


# ops that make the host wait for the device on CUDA (or that are data-dependent and do internally)
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(), float(), bool() of a tensor
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_HOST_METHODS = {"tolist", "numpy", "cpu", "__array__"}


def _raise(msg: str) -> None:
    raise HostSync(msg)


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, host_ptrs: set[int], report=_raise) -> None:
        super().__init__()
        self.host_ptrs, self.report = host_ptrs, report

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            t = args[0] if args else None
            if not (isinstance(t, torch.Tensor) and t.data_ptr() in self.host_ptrs):
                self.report(f"{func} would make the host wait for the GPU")
        if func in _INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx):
                self.report(f"{func} with a boolean index (a nonzero) would make the host wait for the GPU")
        return func(*args, **kwargs)


class _HostMethods(TorchFunctionMode):
    def __init__(self, report=_raise) -> None:
        super().__init__()
        self.report = report

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _HOST_METHODS:
            self.report(f"Tensor.{func.__name__} copies to host memory (waits for the GPU)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(host_tensors=(), found: list | None = None):
    """Raise :class:`HostSync` on any op in the block that would synchronise a CUDA device with the
    host (or, with ``found``, append its description there and go on). ``host_tensors`` live in
    host memory even in a CUDA run (e.g. the step counters of a non-capturable optimizer): reading
    them is allowed."""
    ptrs = {t.data_ptr() for t in host_tensors}
    report = _raise if found is None else found.append
    with _HostMethods(report), _SyncDispatch(ptrs, report):
        yield


@pytest.fixture
def cuda_routes(monkeypatch):
    """Make CPU tensors take the mask routes of CUDA tensors."""
    monkeypatch.setattr(nmmasks, "_KERNEL_MIN_NUMEL", 1 << 62)  # the torch path, not numba
    monkeypatch.setattr(T.api, "_AS_CUDA", True)


# ------------------------------------------------------------------------------------------------
# the guard itself catches what it must (a guard that cannot fail proves nothing)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["item", "int", "float", "bool", "equal", "nonzero", "bool index",
                                  "bool index put", "tolist", "numpy", "cpu", "unique", "masked_select"])
def test_guard_catches_every_kind_of_sync(what):
    t = torch.arange(8.0)
    b = t > 3
    ops = {
        "item": lambda: t.sum().item(), "int": lambda: int(t[0]), "float": lambda: float(t[1]),
        "bool": lambda: bool(b.any()), "equal": lambda: torch.equal(t, t), "nonzero": lambda: b.nonzero(),
        "bool index": lambda: t[b], "bool index put": lambda: t.clone().index_put_((b,), t[:4] * 0),
        "tolist": lambda: t.tolist(), "numpy": lambda: t.numpy(), "cpu": lambda: t.cpu(),
        "unique": lambda: torch.unique(t), "masked_select": lambda: t.masked_select(b),
    }
    ops[what]()  # fine outside
    with pytest.raises(HostSync), no_host_sync():
        ops[what]()


def test_guard_allows_host_tensors_and_plain_ops():
    step = torch.tensor(3.0)
    with no_host_sync([step]):
        assert step.item() == 3.0
        t = torch.randn(4, 8)
        t.masked_fill_(t > 0, 0.0)
        torch.where(t < 0, t, 1.0).sum(1).argmax()


# ------------------------------------------------------------------------------------------------
# masks on the CUDA routes
# ------------------------------------------------------------------------------------------------


def test_masks_on_cuda_routes_do_not_sync(cuda_routes, monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[3, 5] = float("nan")
    w[7, 9] = float("inf")
    with no_host_sync():
        plain = nmsparse.nm_mask(w, 2, 4)
        conv = nmsparse.layer_mask(torch.randn(16, 8, 3, 3), 2, 4)
        opt = nmsparse.transposable_mask(w, 2, 4, "optimal")
        opt_layer = nmsparse.transposable_layer_mask(torch.randn(16, 8, 3, 3), 2, 4, "optimal")
    assert nmsparse.is_nm(plain, 2, 4) and nmsparse.layer_is_nm(conv, 2, 4)
    assert nmsparse.is_transposable_nm(opt, 2, 4) and nmsparse.layer_is_transposable_nm(opt_layer, 2, 4)
    monkeypatch.setattr(T.api, "_AS_CUDA", False)
    assert torch.equal(plain, nmsparse.nm_mask(w, 2, 4))  # numba or not: the same mask
    a = w.abs().double().nan_to_num(posinf=1e300, nan=1e300)
    assert (a * opt).sum() == (a * nmsparse.transposable_mask(w, 2, 4, "optimal")).sum()


# ------------------------------------------------------------------------------------------------
# the step counter: a Python int, kept equal to the buffer that is saved and loaded
# ------------------------------------------------------------------------------------------------


def _sparse_mlp(update_every=3, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 8))
    nmsparse.sparsify(model, 2, 4, method="srste", decay=2e-4, update_every=update_every, keep_dense=(), **kw)
    return model


def _p(model, i=0):
    return model[i].parametrizations.weight[0]


def test_refresh_schedule_without_host_reads(cuda_routes):
    """Forward passes under the guard: masks recomputed exactly every update_every passes."""
    model = _sparse_mlp(update_every=3)
    x = torch.randn(16, 64)
    p = _p(model)
    seen = []
    for k in range(7):
        with torch.no_grad():
            model[0].parametrizations.weight.original.add_(torch.randn(128, 64) * 0.5)
        w = model[0].parametrizations.weight.original.detach().clone()
        with no_host_sync():
            model(x)
        expect = nmsparse.nm_mask(w, 2, 4) if k % 3 == 0 else seen[-1]
        assert torch.equal(p.mask, expect), k
        seen.append(p.mask.clone())
        assert int(p.step) == k + 1 == p.step_count()
    assert not torch.equal(seen[0], seen[3])  # the weights moved enough for the schedule to show


def test_step_survives_every_way_of_writing_the_buffer(cuda_routes):
    model = _sparse_mlp(update_every=4)
    x = torch.randn(4, 64)
    for _ in range(5):
        model(x)
    p = _p(model)
    assert p.step_count() == int(p.step) == 5
    state = copy.deepcopy(model.state_dict())
    fresh = _sparse_mlp(update_every=4)
    fresh.load_state_dict(state)  # in place (copy_)
    assert _p(fresh).step_count() == 5 and torch.equal(_p(fresh).mask, p.mask)
    fresh.load_state_dict(state, assign=True)  # a new tensor object
    assert _p(fresh).step_count() == 5
    with torch.no_grad():
        _p(fresh).step.copy_(torch.tensor(11))
    assert _p(fresh).step_count() == 11
    fresh.state_dict()["0.parametrizations.weight.0.step"].copy_(torch.tensor(9))  # the Hugging Face loader
    assert _p(fresh).step_count() == 9
    _p(fresh).step.data = torch.tensor(2)  # FSDP2 moves buffers this way
    assert _p(fresh).step_count() == 2
    clone = copy.deepcopy(model)
    assert _p(clone).step_count() == 5
    model._apply(lambda t: t.clone())  # what .to(device) does: new tensors, same values
    with no_host_sync():  # no read after a move
        assert p.step_count() == 5
        model(x)  # pass 5: 5 % 4 != 0, no update
        model(x)  # pass 6
    assert int(p.step) == 7 == p.step_count()
    assert model.state_dict()["0.parametrizations.weight.0.step"].item() == 7


def test_module_called_twice_across_a_mask_update():
    """A layer used twice in one pass, the mask updated between the two calls: each call's backward
    uses the mask its forward used (the old in-place write made backward fail here)."""
    torch.manual_seed(1)
    lin = nn.Linear(16, 16, bias=False)
    nmsparse.sparsify(lin, 2, 4, method="srste", decay=0.5, update_every=2, keep_dense=())
    p = lin.parametrizations.weight[0]
    x = torch.randn(3, 16)
    lin(x)  # pass 0 (update), step -> 1
    with torch.no_grad():
        lin.parametrizations.weight.original.mul_(torch.rand(16, 16) * 2)
    w = lin.parametrizations.weight.original
    m1 = p.mask.clone()  # pass 1 uses the old mask ...
    y = lin(lin(x))  # ... pass 2 (the inner call's output feeds the outer) recomputes it
    m2 = p.mask.clone()
    assert not torch.equal(m1, m2)
    y.square().sum().backward()
    # reference: straight-through gradients of the two sparse weights, plus each call's SR-STE term
    wd = w.detach()
    e1, e2 = (wd * m1).requires_grad_(True), (wd * m2).requires_grad_(True)
    ((x @ e1.t()) @ e2.t()).square().sum().backward()
    ref = e1.grad + e2.grad + 0.5 * (~m1) * wd + 0.5 * (~m2) * wd
    assert torch.allclose(w.grad, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# a whole SR-STE training step
# ------------------------------------------------------------------------------------------------


def _train(model, opt, xs, guard):
    for i, x in enumerate(xs):
        # the first step creates the optimizer's state; AdamW's step counters stay in host memory on
        # CUDA too (not capturable), so reading them is no sync
        host = [s for st in opt.state.values() for s in st.values() if isinstance(s, torch.Tensor) and s.dim() == 0]
        ctx = no_host_sync(host) if guard and i > 0 else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(model(x), torch.arange(len(x)) % 8)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("masks", ["nm", "transposable optimal"])
def test_srste_training_step_does_not_sync(cuda_routes, opt_name, masks):
    """Forward, backward, optimizer step and the mask refresh (every 3 passes) of a small MLP: no
    host sync, and the same weights and masks as without the guard."""
    kw = dict(transposable=True, mask_method="optimal") if masks != "nm" else {}
    xs = [torch.randn(8, 64) for _ in range(7)]
    runs = []
    for guard in (False, True):
        model = _sparse_mlp(update_every=3, **kw)
        if opt_name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _train(model, opt, xs, guard)
        runs.append(model)
    assert _p(runs[1]).step_count() == 7
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), k


def test_semi_structured_training_step_does_not_sync(cuda_routes):
    """The 2:4 semi-structured backend (CPU emulation: CUTLASS packing, unpack, matmul) in bf16
    autocast with transposable masks: forward, sparse input gradient, weight gradient, SGD step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    rep = nmsparse.sparsify(model, 2, 4, method="srste", keep_dense=(), transposable=True, mask_method="optimal",
                            update_every=2, backend="semi-structured")
    assert all("input gradient sparse" in v for v in rep.settings["backend_layers"].values())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(32, 64)
        with no_host_sync():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert _p(model).step_count() == 3


# ------------------------------------------------------------------------------------------------
# with CUDA: the real thing, under torch's own sync detector
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["dense", "semi-structured"])
def test_cuda_training_step_does_not_sync(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda()
    nmsparse.sparsify(model, 2, 4, method="srste", keep_dense=(), transposable=True, mask_method="optimal",
                      update_every=3, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # its step counters stay in host memory
    x = torch.randn(64, 256, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: lazy initialisation (cuBLAS handles, the patterns' one copy to the GPU)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):  # two mask updates
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert _p(model).step_count() == int(_p(model).step) == 7


# ------------------------------------------------------------------------------------------------
# DDP: its per-pass buffer broadcast must not force a host read either
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("ignore", [False, True])
def test_ddp_passes_do_not_sync(cuda_routes, tmp_path, ignore):
    """Passes through a user's own DDP wrap (broadcast_buffers=True broadcasts, on every pass, the
    buffers it listed at wrap time) and through the training loop's (which tells DDP to skip the N:M
    buffers that refreshes replace) make no host read."""
    import torch.distributed as dist

    from nmsparse.training.loop import _refreshed_nm_buffers

    model = _sparse_mlp(update_every=2)
    names = _refreshed_nm_buffers(model)
    assert sorted(names) == sorted(f"{i}.parametrizations.weight.0.{b}" for i in (0, 2, 4) for b in ("mask", "step"))
    fixed = nn.Sequential(nn.Linear(8, 8))
    nmsparse.sparsify(fixed, 2, 4, method="fixed", keep_dense=())
    assert _refreshed_nm_buffers(fixed) == []  # a fixed mask is never replaced: DDP keeps syncing it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if ignore:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        net = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(5):
            with no_host_sync() if i else contextlib.nullcontext():
                loss = net(torch.randn(8, 64)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        dist.destroy_process_group()
    assert _p(model).step_count() == int(_p(model).step) == 5


# ------------------------------------------------------------------------------------------------
# approximate transposable masks: one host read per call (does any tile need the exact solver?)
# ------------------------------------------------------------------------------------------------


def test_approx_transposable_24_reads_the_host_once(cuda_routes, monkeypatch):
    torch.manual_seed(3)
    w = torch.randn(128, 256)
    found = []
    with no_host_sync(found=found):
        mask = nmsparse.transposable_mask(w, 2, 4, "approx")
    assert found == ["Tensor.tolist copies to host memory (waits for the GPU)"]  # the two counts, together
    monkeypatch.setattr(T.api, "_AS_CUDA", False)
    assert torch.equal(mask, nmsparse.transposable_mask(w, 2, 4, "approx"))  # the numba kernel's mask
