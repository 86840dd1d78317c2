"""SparseGPT(precision="float32"): the factorizations and the column loop in float32 (the reference
code's and llm-compressor's precision); N:M, close to float64, recorded in the report."""

from __future__ import annotations

import copy

import pytest
import torch

import nmsparse
from tests.test_model_zoo import build, check_nm


@pytest.mark.parametrize("case", ["bert", "cnn"])
def test_float32_is_nm_and_close_to_float64(case):
    model, batches, _ = build(case)
    ref = copy.deepcopy(model)
    rep = nmsparse.prune(model, 2, 4, method=nmsparse.SparseGPT(precision="float32"), calib=batches, keep_dense=())
    rep64 = nmsparse.prune(ref, 2, 4, method="sparsegpt", calib=batches, keep_dense=())
    check_nm(model, rep)
    assert rep.settings["precision"] == "float32" and rep64.settings["precision"] == "float64"
    for k, r in rep64.results.items():
        assert rep.results[k].error_after == pytest.approx(r.error_after, rel=0.05, abs=1e-6), k
    diff = [float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), ref.state_dict().values())]
    assert 0 < max(diff) < 0.05  # not the float64 bits, but close


def test_float32_solver_returns_float32():
    from nmsparse.pruning.magnitude import select
    from nmsparse.pruning.sparsegpt import sparsegpt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    w = torch.randn(4, 8, generator=g)
    sel = lambda s: select(s, 2, 4)  # noqa: E731
    w32, keep32 = sparsegpt(w, x.T.double() @ x.double(), 2, 4, sel, dtype=torch.float32)
    w64, keep64 = sparsegpt(w, x.T.double() @ x.double(), 2, 4, sel)
    assert w32.dtype == torch.float32 and w64.dtype == torch.float64
    assert torch.equal(keep32, keep64)
    assert torch.allclose(w32.double(), w64, atol=1e-4)
