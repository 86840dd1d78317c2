"""nmsparse.pruning: one-shot N:M conversion of trained models (magnitude, Wanda, SparseGPT, AdaPrune)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.masking.layout import layer_is_nm
from nmsparse.pruning import adam_solve, exact_solve, im2col, prune
from nmsparse.calibration import collect as calibration
from nmsparse.calibration.geometry import LayerGeometry

HAS_TRANSPOSABLE = importlib.util.find_spec("nmsparse.masking.transposable") is not None
CASES = [("magnitude", "exact"), ("wanda", "exact"), ("sparsegpt", "exact"), ("adaprune", "exact"),
         ("adaprune", "adam")]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 16, 1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10),
    )


def calib_set(batches: int = 3, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 6, 6, generator=g) for _ in range(batches)]


def _fast(solver: str, method: str = "adaprune") -> dict:
    if method != "adaprune":
        return {}  # solver and its options are AdaPrune's only
    return dict(solver=solver, iterations=30) if solver == "adam" else dict(solver=solver)


@pytest.mark.parametrize("method,solver", CASES)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_every_method_gives_valid_nm(method, solver, nm, layout):
    n, m = nm
    model = small_net()
    dense = copy.deepcopy(model)
    report = prune(model, n, m, method=method, calib=calib_set(), layout=layout, **_fast(solver, method))
    mods = dict(model.named_modules())
    assert report.sparse, "something must be pruned"
    for e in report.layers:
        w = mods[e.name].weight
        if e.sparse:
            assert layer_is_nm(w, n, m, layout), e.param
            r = report.results[e.param]
            assert 0 < r.kept_abs <= 1
            assert r.error_before is not None and r.error_after is not None and r.rows > 0
        else:
            assert torch.equal(w, dict(dense.named_modules())[e.name].weight), "dense layers are untouched"
    assert report.layers[0].reason.startswith("first") and report.layers[-1].reason.startswith("last")
    out = model(calib_set()[0])
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not HAS_TRANSPOSABLE, reason="nmsparse.masking.transposable not available")
@pytest.mark.parametrize("method,solver", CASES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_transposable(method, solver, nm):
    from nmsparse.masking.transposable import layer_is_transposable_nm

    n, m = nm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (32, 1, 1)), nn.Conv2d(32, 16, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))
    calib = [torch.randn(16, 16) for _ in range(2)]
    report = prune(model, n, m, method=method, calib=calib, transposable=True, keep_dense=(), **_fast(solver, method))
    mods = dict(model.named_modules())
    for e in report.sparse:
        assert layer_is_transposable_nm(mods[e.name].weight, n, m), e.param
        assert layer_is_nm(mods[e.name].weight, n, m), e.param
    dense = {e.name: e.reason for e in report.dense}
    if m == 8:
        assert set(dense) == {"8"} and "transposable" in dense["8"]
    else:
        assert not dense
    assert report.settings["transposable"] is True


def planted_problem(seed: int = 0, d: int = 32, out: int = 16, rows: int = 400):
    """A Linear layer whose inputs are strongly correlated (low rank plus noise), so refitting the kept
    weights can absorb most of what the pruned ones did."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, d, generator=g)
    x = torch.randn(rows, 6, generator=g) @ basis + 0.05 * torch.randn(rows, d, generator=g)
    layer = nn.Linear(d, out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, d, generator=g))
        layer.bias.copy_(torch.randn(out, generator=g))
    return layer, x


def _layer_error(layer: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = dense(x)
        return float(((layer(x) - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_adaprune_and_sparsegpt_beat_magnitude_on_planted_problem(nm):
    n, m = nm
    dense, x = planted_problem()
    calib = [x[i:i + 50] for i in range(0, len(x), 50)]
    errors = {}
    for method, solver in CASES:
        layer = copy.deepcopy(dense)
        kw = dict(solver=solver, iterations=1000) if solver == "adam" else dict(solver=solver)
        kw = kw if method == "adaprune" else {}
        report = prune(layer, n, m, method=method, calib=calib, keep_dense=(), **kw)
        err = _layer_error(layer, dense, x)
        r = report.results["weight"]
        assert r.error_after == pytest.approx(err, rel=1e-3, abs=1e-6), "report error = measured error"
        errors[f"{method}-{solver}"] = err
    mag = errors["magnitude-exact"]
    assert errors["adaprune-exact"] < 0.2 * mag
    assert errors["adaprune-adam"] < 0.8 * mag
    assert errors["sparsegpt-exact"] < 0.5 * mag
    assert errors["adaprune-exact"] <= errors["adaprune-adam"] + 1e-9  # the exact optimum on this support


def test_exact_solver_matches_lstsq():
    g = torch.Generator().manual_seed(3)
    rows, d, out = 60, 12, 5
    X = torch.randn(rows, d, generator=g, dtype=torch.float64)
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    keep = nmsparse.nm_mask(torch.randn(out, d, generator=g), 2, 4, dim=1)
    keep[0, :] = False  # rows with different support sizes
    keep[0, :3] = True
    H = X.T @ X
    got = exact_solve(W, H, keep, damp=0.0)
    lam = 0.7
    got_ridge = exact_solve(W, H, keep, damp=lam / float(H.diagonal().mean()))
    for r in range(out):
        S = keep[r].nonzero().squeeze(1)
        want = torch.linalg.lstsq(X[:, S], X @ W[r]).solution
        assert torch.allclose(got[r, S], want, atol=1e-9)
        assert (got[r, ~keep[r]] == 0).all()
        A = torch.cat([X[:, S], lam ** 0.5 * torch.eye(len(S), dtype=torch.float64)])
        b = torch.cat([X @ W[r], lam ** 0.5 * W[r, S]])
        assert torch.allclose(got_ridge[r, S], torch.linalg.lstsq(A, b).solution, atol=1e-9)


def test_adam_solver_approaches_exact_solution():
    g = torch.Generator().manual_seed(4)
    basis = torch.randn(3, 8, generator=g, dtype=torch.float64)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64) @ basis + 0.1 * torch.randn(200, 8, generator=g,
                                                                                          dtype=torch.float64)
    W = torch.randn(3, 8, generator=g, dtype=torch.float64)
    keep = nmsparse.nm_mask(W, 2, 4, dim=1)
    H = X.T @ X
    exact = exact_solve(W, H, keep, damp=0.0)
    bins = [(X[i:i + 50].T @ X[i:i + 50], 50) for i in range(0, 200, 50)]
    start = adam_solve(W, keep, bins, bias=False, iterations=0)
    assert torch.equal(start, (W * keep).float())
    fitted = adam_solve(W, keep, bins, bias=False, iterations=3000, lr=1e-2).double()

    def err(v):
        return float(((v - W) @ H * (v - W)).sum())

    assert (fitted[~keep] == 0).all()
    assert err(fitted) < err(W * keep) * 0.5
    assert err(fitted) < err(exact) * 1.05 + 1e-6


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "adaprune"])
@pytest.mark.parametrize("calib", [None, []])
def test_missing_calibration_is_a_clear_error(method, calib):
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"needs calibration data.*calib="):
        prune(model, 2, 4, method=method, calib=calib)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model untouched"


def test_magnitude_needs_no_calibration_and_matches_nm_mask():
    model = small_net()
    dense = copy.deepcopy(model)
    report = prune(model, 2, 4, method="magnitude")
    mods, dmods = dict(model.named_modules()), dict(dense.named_modules())
    for e in report.sparse:
        w0 = dmods[e.name].weight
        assert torch.equal(mods[e.name].weight, w0 * nmsparse.layer_mask(w0, 2, 4))
        assert report.results[e.param].error_before is None
    assert "magnitude" in report.table()


@pytest.mark.parametrize("method,solver", CASES)
@pytest.mark.parametrize("density", [0.5, 0.25])
def test_existing_zeros_are_respected(method, solver, density):
    """From an unstructured-sparse model: zeros are never kept over non-zeros and never revived."""
    dense, x = planted_problem(seed=5, d=32, out=16)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        dense.weight.mul_((torch.rand(dense.weight.shape, generator=g) < density).float())
    w0 = dense.weight.detach().clone()
    layer = copy.deepcopy(dense)
    prune(layer, 2, 4, method=method, calib=[x], keep_dense=(), **_fast(solver, method))
    w = layer.weight.detach()
    assert ((w != 0) <= (w0 != 0)).all(), "a zero weight was revived"
    nnz0 = (w0 != 0).view(16, -1, 4).sum(-1)
    nnz = (w != 0).view(16, -1, 4).sum(-1)
    assert torch.equal(nnz, nnz0.clamp(max=2)), "each group keeps min(N, existing non-zeros)"
    if method == "adaprune":  # its mask is by magnitude: the kept ones are the largest existing
        keep = nmsparse.nm_mask(w0, 2, 4, dim=1) & (w0 != 0)
        assert torch.equal(w != 0, keep)


def test_keep_zeros_false_lets_the_fit_use_them():
    dense, x = planted_problem(seed=5)
    with torch.no_grad():
        dense.weight[:, ::2] = 0  # every group has exactly 2 non-zeros... and 2 zeros
        dense.weight[:, 1::4] = 0  # ... now 1 non-zero per group
    layer = copy.deepcopy(dense)
    prune(layer, 2, 4, method="adaprune", calib=[x], keep_dense=(), keep_zeros=False)
    assert int((layer.weight != 0).sum()) > int((dense.weight != 0).sum())
    assert layer_is_nm(layer.weight, 2, 4)


def test_layers_see_inputs_of_the_already_pruned_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    dense = copy.deepcopy(model)
    report = prune(model, 2, 4, method="adaprune", calib=[x[:32], (x[32:], torch.zeros(32))], keep_dense=())
    with torch.no_grad():
        x2 = model[1](model[0](x))  # input of layer 2 in the pruned model
        ref = dense[2](x2)
        err = float(((model[2](x2) - ref) ** 2).sum() / (ref ** 2).sum())
        x2_dense = dense[1](dense[0](x))
        err_dense_inputs = float(((model[2](x2_dense) - dense[2](x2_dense)) ** 2).sum() / (dense[2](x2_dense) ** 2).sum())
    assert report.results["2.weight"].error_after == pytest.approx(err, rel=1e-4)
    assert report.results["2.weight"].error_after != pytest.approx(err_dense_inputs, rel=1e-4)


def test_forward_order_and_shared_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(24, 4)  # registered first, runs last
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.inp = nn.Linear(4, 8)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            return self.out(torch.cat([self.q(h), self.k(h), self.v(h)], -1))

    net = Net()
    mods = {k: v for k, v in net.named_modules() if isinstance(v, nn.Linear)}
    groups = calibration.forward_order(net, mods, [torch.randn(3, 4)])
    assert groups == [["inp"], ["q", "k", "v"], ["out"]]
    report = prune(net, 2, 4, method="sparsegpt", calib=[torch.randn(16, 4)], keep_dense=())
    assert set(report.results) == {"q.weight", "k.weight", "v.weight", "out.weight", "inp.weight"}


def test_calibration_accepts_pairs_generators_and_keyword_batches():
    class Tok(nn.Module):
        """Takes keyword batches like a tokenizer's output; padded tokens carry garbage."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.lin = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            return self.head(self.lin(self.emb(input_ids)))

    torch.manual_seed(0)
    net = Tok()
    ids = torch.randint(1, 50, (4, 6))
    am = torch.ones(4, 6, dtype=torch.long)
    am[0, 3:] = 0
    am[2, 1:] = 0
    padded = ids.clone()
    padded[am == 0] = 0  # the padding token's embedding must not enter the statistics
    geom = LayerGeometry(net.lin, "channels")
    col = calibration.LayerCollector(geom, torch.device("cpu"))
    calibration.collect(net, {"lin": col}, [{"input_ids": padded, "attention_mask": am}])
    feats = net.emb(ids)[am.bool()].detach()
    f1 = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
    assert col.grams[0].rows == int(am.sum())
    assert torch.allclose(col.grams[0].H, f1.T @ f1, atol=1e-4)

    # generators are read once and reused for every layer; (inputs, targets) pairs work
    model = small_net()
    gen = ((x, torch.zeros(len(x))) for x in calib_set())
    report = prune(model, 2, 4, method="wanda", calib=gen)
    assert all(r.rows > 0 for r in report.results.values())


def test_im2col_matches_convolutions():
    torch.manual_seed(0)
    cases = [
        (nn.Conv1d(4, 6, 3, padding="same", dilation=2), (2, 4, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 7)),
        (nn.Conv2d(4, 6, (3, 2), padding=(1, 0), padding_mode="reflect", dilation=(1, 2)), (2, 4, 8, 8)),
        (nn.Conv3d(4, 2, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0)), (2, 4, 5, 6, 3)),
    ]
    for conv, shape in cases:
        x = torch.randn(shape)
        y = conv(x)
        f = im2col(conv, x)
        y2 = f @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
        y2 = y2.reshape(y.shape[0], *y.shape[2:], -1).movedim(-1, 1)
        assert torch.allclose(y, y2, atol=1e-5), conv


def test_geometry_roundtrip_and_channel_groups():
    conv = nn.Conv2d(8, 12, 3, groups=2)
    geom = LayerGeometry(conv, "channels")
    mats = geom.weight2d()
    assert len(mats) == 2 and mats[0].shape == (6, 4 * 9)
    assert torch.equal(geom.assemble(mats), conv.weight.detach())
    # grouped order: each group of 4 consecutive columns is 4 channels at one kernel position
    w = conv.weight.detach()
    assert torch.equal(mats[1][:, :4], w[6:, :, 0, 0])
    x = torch.randn(2, 8, 5, 5)
    f = geom.features(x)
    y = conv(x)
    out_g = [geom.problem_features(f, g) @ mats[g].T for g in range(2)]
    y2 = torch.cat(out_g, 1) + conv.bias
    assert torch.allclose(y2.reshape(2, 3, 3, 12).permute(0, 3, 1, 2), y, atol=1e-5)


def test_report_is_serialisable_and_restores_mode_and_hooks():
    model = small_net().train()
    report = prune(model, 2, 4, method="sparsegpt", calib=calib_set())
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    d = json.loads(json.dumps(report.to_dict()))
    assert d["settings"]["method"] == "sparsegpt" and d["n"] == 2
    assert set(d["results"]) == {e.param for e in report.sparse}
    text = report.table()
    assert "dense: first weight layer" in text and "err after" in text


def test_argument_errors():
    model = small_net()
    with pytest.raises(ValueError, match="method must be one of"):
        prune(model, 2, 4, method="obs")
    with pytest.raises(ValueError, match="solver must be one of"):
        prune(model, 2, 4, method="adaprune", solver="sgd", calib=calib_set())
    with pytest.raises(ValueError, match="n < m"):
        prune(model, 4, 4, method="magnitude")
    with pytest.raises(ValueError, match="include pattern"):
        prune(model, 2, 4, method="magnitude", include="nope.*")
    sub = prune(model, 2, 4, method="magnitude", include=["2", "4"])
    assert {e.name for e in sub.sparse} == {"2", "4"}


def test_finetune_recipe_keeps_the_pruned_support():
    model = small_net()
    calib = calib_set()
    prune(model, 2, 4, method="adaprune", calib=calib)
    support = {k: (v != 0) for k, v in model.state_dict().items() if k.endswith("weight")}
    nmsparse.sparsify(model, 2, 4, method="fixed")
    for k, mask in nmsparse.masks(model).items():
        assert (support[k] <= mask).all(), "the frozen mask keeps every surviving weight"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in calib:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    nmsparse.finalize(model)
    for k, v in model.state_dict().items():
        if k in support and k not in ("0.weight", "14.weight"):
            assert layer_is_nm(v, 2, 4), k


def test_recalibrate_batchnorm():
    from nmsparse.pruning import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).train()
    xs = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, xs) == 2
    assert model.training and model[1].momentum == 0.1
    with torch.no_grad():
        h = model[0](torch.cat(xs))
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([v.var((0, 2, 3)) for v in h.split(8)]).mean(0)  # average of batch variances
    assert torch.allclose(model[1].running_var, per_batch, rtol=1e-4)
    assert recalibrate_batchnorm(nn.Linear(2, 2), None) == 0
