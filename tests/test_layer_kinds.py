"""transformers' Conv1D (weight stored (in, out)) and nn.MultiheadAttention.in_proj_weight (3E, E):
sparsify, prune, finalize, masks and the one place that knows reduction axes (issue 12, defects 2, 3)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import finalize, masks, prune, sparsify
from nmsparse.masking.layout import as_matrix, reduction_dim, target_is_nm, target_mask
from nmsparse.calibration.collect import LayerCollector
from nmsparse.calibration.geometry import LayerGeometry

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

METHODS = ["magnitude", "wanda", "sparsegpt", "adaprune"]


def test_importing_nmsparse_does_not_import_transformers():
    code = "import sys, nmsparse, nmsparse.prune; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_reduction_dim_is_the_one_place_that_knows_the_axes():
    assert reduction_dim(nn.Linear(8, 4)) == 1
    assert reduction_dim(nn.Conv2d(8, 4, 3)) == 1
    assert reduction_dim(Conv1D(4, 8)) == 0
    assert reduction_dim(nn.MultiheadAttention(8, 2), "in_proj_weight") == 1
    c = Conv1D(4, 8)
    assert torch.equal(as_matrix(c.weight, c), c.weight.t())
    with pytest.raises(ValueError, match=r"Embedding.weight is not a tensor nmsparse can make N:M"):
        reduction_dim(nn.Embedding(4, 8))
    with pytest.raises(ValueError, match=r"MultiheadAttention.in_proj_weight is not a tensor"):
        reduction_dim(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), "in_proj_weight")


class GPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(16, 8)  # (in=8, out=16)
        self.c_proj = Conv1D(8, 16)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.c_proj(torch.relu(self.c_fc(x)))))


def test_conv1d_sparsify_groups_along_dim0_and_finalizes():
    torch.manual_seed(0)
    model = GPTBlock()
    rep = sparsify(model, 2, 4, keep_dense=(), transposable=True)
    assert {e.param for e in rep.sparse} == {"c_fc.weight", "c_proj.weight", "out.weight"}
    mk = masks(model)
    w = model.c_fc.parametrizations.weight.original.detach()
    assert mk["c_fc.weight"].shape == (8, 16)
    assert nmsparse.is_nm(mk["c_fc.weight"], 2, 4, dim=0)
    assert nmsparse.is_transposable_nm(mk["c_fc.weight"].t(), 2, 4)
    assert torch.equal(target_mask(w, model.c_fc, "weight", 2, 4), nmsparse.nm_mask(w, 2, 4, dim=0))
    x = torch.randn(5, 8)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    model.eval()
    out = model(x)
    finalize(model)
    assert type(model.c_fc) is Conv1D and torch.equal(model(x), out)
    assert target_is_nm(model.c_fc.weight, model.c_fc, "weight", 2, 4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transposable", [False, True])
def test_conv1d_prunes_exactly_like_the_equivalent_linear(method, transposable):
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(16, 8))
    lin = nn.Sequential(nn.Linear(8, 16))
    with torch.no_grad():
        lin[0].weight.copy_(conv[0].weight.t())
        lin[0].bias.copy_(conv[0].bias)
    calib = [torch.randn(32, 8) for _ in range(2)]
    kw = dict(method=method, calib=calib, keep_dense=(), transposable=transposable)
    rc, rl = prune(conv, 2, 4, **kw), prune(lin, 2, 4, **kw)
    assert torch.allclose(conv[0].weight.t(), lin[0].weight, atol=1e-6)
    assert torch.allclose(conv[0].bias, lin[0].bias, atol=1e-6)
    assert rc.results["0.weight"].error_after == pytest.approx(rl.results["0.weight"].error_after, rel=1e-6, abs=1e-9)
    assert target_is_nm(conv[0].weight, conv[0], "weight", 2, 4)


class Attn(nn.Module):
    def __init__(self, batch_first=True, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
        self.head = nn.Linear(8, 4)

    def forward(self, q, kv=None):
        kv = q if kv is None else kv
        return self.head(self.attn(q, kv, kv, need_weights=False)[0])


def test_mha_in_proj_sparsify_fast_and_slow_paths_read_the_sparse_weight():
    torch.manual_seed(0)
    model = Attn()
    rep = sparsify(model, 2, 4, keep_dense=())
    assert {e.param for e in rep.sparse} == {"attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    assert set(masks(model)) == {e.param for e in rep.sparse}
    x = torch.randn(3, 5, 8)
    model.train()
    model(x).sum().backward()
    assert model.attn.parametrizations.in_proj_weight.original.grad is not None
    model.eval()
    with torch.no_grad():
        fast = model(x)  # eval + no_grad + batch_first self-attention: PyTorch's fused fast path
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            slow = model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    dense = finalize(copy.deepcopy(model))
    manual = copy.deepcopy(dense)
    assert torch.allclose(fast, slow, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(dense(x), slow, atol=1e-5)
    assert nmsparse.layer_is_nm(dense.attn.in_proj_weight, 2, 4)
    sd = dense.state_dict()
    assert "attn.in_proj_weight" in sd and not any("parametrizations" in k for k in sd)
    fresh = Attn()
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), manual(x), atol=1e-6)


def test_mha_cross_attention_grams_come_from_query_key_and_value():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)  # batch_first=False: inputs (L, N, E)
    geom = LayerGeometry(mha, "channels", "in_proj_weight")
    assert (geom.problems, geom.inputs, geom.out_g, geom.d, geom.has_bias) == (3, 3, 8, 8, True)
    col = LayerCollector(geom, torch.device("cpu"))
    q, k, v = torch.randn(5, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    col.add((q, k, v))
    for g, x in enumerate((q, k, v)):
        f = torch.cat([x.reshape(-1, 8), torch.ones(x.shape[0] * 2, 1)], 1).double()
        assert torch.allclose(col.grams[g].H, f.T @ f, atol=1e-4)
    mats = geom.weight2d()
    assert all(torch.equal(mats[g], mha.in_proj_weight[8 * g:8 * (g + 1)]) for g in range(3))
    assert torch.equal(geom.assemble(mats), mha.in_proj_weight)


@pytest.mark.parametrize("method", METHODS)
def test_mha_prune_self_and_cross_attention(method):
    torch.manual_seed(0)
    for cross in (False, True):
        model = Attn(batch_first=False)
        calib = [(torch.randn(5, 2, 8), torch.randn(6, 2, 8)) if cross else torch.randn(5, 2, 8) for _ in range(2)]
        calib = [c if not cross else _Pair(*c) for c in calib]
        m2 = _Wrap(model) if cross else model
        rep = prune(m2, 2, 4, method=method, calib=calib, keep_dense=(), transposable=True)
        name = "m.attn.in_proj_weight" if cross else "attn.in_proj_weight"
        assert name in {e.param for e in rep.sparse}
        assert rep.results[name].error_after is not None  # calibrated on its own inputs
        out_proj = name.replace("in_proj_weight", "out_proj.weight")
        assert rep.results[out_proj].error_after is not None and not rep.results[out_proj].note
        assert nmsparse.is_transposable_nm(model.attn.in_proj_weight.detach(), 2, 4)


class _Pair(dict):
    def __init__(self, q, kv):
        super().__init__(q=q, kv=kv)


class _Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, q, kv):
        return self.m(q, kv)


def test_mha_with_separate_projections_is_reported_dense():
    mha = nn.Sequential()
    mha.add_module("attn", nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    mha.add_module("a", nn.Linear(8, 8))
    mha.add_module("b", nn.Linear(8, 8))
    rep = sparsify(mha, 2, 4, keep_dense=())
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["attn.q_proj_weight"].startswith("separate q/k/v projection weights (kdim or vdim != embed_dim)")
    assert {"attn.k_proj_weight", "attn.v_proj_weight"} <= set(reasons)
    assert {e.param for e in rep.sparse} == {"attn.out_proj.weight", "a.weight", "b.weight"}


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_out_proj_is_calibrated_on_the_attention_output(batch_first):
    """MHA never calls its out_proj Linear: its calibration input is recovered by the attention run
    with an identity out_proj; checked against inverting the (invertible) projection."""
    from nmsparse.calibration import collect as calibration

    torch.manual_seed(0)
    model = Attn(batch_first=batch_first).eval()
    weight = model.attn.out_proj.weight
    x = torch.randn(3, 5, 8)
    col = LayerCollector(LayerGeometry(model.attn.out_proj, "channels"), torch.device("cpu"))
    calibration.collect(model, {"attn.out_proj": col}, [x])
    with torch.no_grad():
        out = model.attn(x, x, x, need_weights=False)[0]
        w, b = model.attn.out_proj.weight.double(), model.attn.out_proj.bias.double()
        pre = torch.linalg.solve(w, (out.double() - b).reshape(-1, 8).T).T  # out = pre @ W^T + b
    f = torch.cat([pre, torch.ones(pre.shape[0], 1, dtype=torch.float64)], 1)
    assert torch.allclose(col.grams[0].H, f.T @ f, atol=1e-3)
    assert model.attn.out_proj.weight is weight and weight.requires_grad  # the Parameter is put back
