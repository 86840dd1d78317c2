"""Wanda and magnitude calibrate without the Gram matrix: feature norms for Wanda's scores and a bounded,
deterministic strided sample of rows for the report's errors (nmsparse.calibration.gram.Gram,
full=False). The masks are those of full-Gram Wanda; the errors are exact while the calibration
set has at most SAMPLE_ROWS rows, and those of the sampled rows beyond."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmsparse
from nmsparse.calibration import collect as calibration
from nmsparse.calibration import gram as gram_mod
from nmsparse.pruning import loop
from tests.test_model_zoo import CASES, build


def _strided_reference(total: int, bound: int) -> tuple[int, list[int]]:
    """The smallest power-of-two stride that keeps at most ``bound`` of ``total`` rows, and their indices."""
    stride = 1
    while -(-total // stride) > bound:
        stride *= 2
    return stride, list(range(0, total, stride))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 23), min_size=1, max_size=12), bound=st.integers(1, 17),
       bias=st.booleans())
def test_sample_is_the_strided_rows_within_the_bound(sizes, bound, bias):
    old = gram_mod.SAMPLE_ROWS
    gram_mod.SAMPLE_ROWS = bound
    try:
        gram = calibration.Gram(3, bias, torch.device("cpu"), full=False)
        total = sum(sizes)
        rows = torch.arange(total, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
        start = 0
        for s in sizes:
            gram.add(rows[start:start + s])
            start += s
    finally:
        gram_mod.SAMPLE_ROWS = old
    stride, idx = _strided_reference(total, bound)
    assert gram.rows == total and gram.stride == stride and gram.H is None
    assert gram.sample.shape == (len(idx), 3 + int(bias))
    assert gram.sample[:, 0].tolist() == [float(i) for i in idx]
    if bias:
        assert (gram.sample[:, 3] == 1).all()
    assert torch.equal(gram.norms, (rows.double() ** 2).sum(0))


def _full_gram(monkeypatch) -> None:
    """Make Wanda and magnitude accumulate the full Gram matrix, as before."""
    monkeypatch.setattr(loop, "NEEDS_GRAM", ("sparsegpt", "adaprune", "wanda", "magnitude"))


@pytest.mark.parametrize("mode", [True, "block"])
@pytest.mark.parametrize("case", list(CASES))
def test_wanda_masks_and_errors_equal_full_gram_wanda(case, mode, monkeypatch):
    model, batches, _ = build(case)
    ref = copy.deepcopy(model)
    rep = nmsparse.prune(model, 2, 4, method="wanda", calib=batches, keep_dense=(), sequential=mode)
    _full_gram(monkeypatch)
    rep_ref = nmsparse.prune(ref, 2, 4, method="wanda", calib=batches, keep_dense=(), sequential=mode)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for k, r in rep_ref.results.items():  # the zoo's calibration sets are small: every row is sampled
        got = rep.results[k]
        assert got.rows == r.rows and got.kept_abs == r.kept_abs
        assert got.error_before == pytest.approx(r.error_before, rel=1e-4, abs=1e-7), k
        assert got.error_after == pytest.approx(r.error_after, rel=1e-4, abs=1e-7), k


def _layer_and_rows(rows: int = 300):
    torch.manual_seed(0)
    layer = nn.Linear(12, 8)
    g = torch.Generator().manual_seed(1)
    return layer, [torch.randn(rows // 3, 12, generator=g) for _ in range(3)]


def _error(layer, dense, x) -> float:
    with torch.no_grad():
        ref = dense(x)
        return float(((layer(x) - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_report_error_is_that_of_the_sampled_rows(method, monkeypatch):
    dense, batches = _layer_and_rows()
    x = torch.cat(batches)
    monkeypatch.setattr(gram_mod, "SAMPLE_ROWS", 64)  # 300 rows: stride 8, rows 0, 8, ..., 296 (38)
    layer = copy.deepcopy(dense)
    rep = nmsparse.prune(nn.Sequential(layer), 2, 4, method=method, calib=batches, keep_dense=())
    r = rep.results["0.weight"]
    assert r.rows == 300
    assert r.error_after == r.error_before
    assert r.error_after == pytest.approx(_error(layer, dense, x[::8]), rel=1e-4)
    assert r.error_after != pytest.approx(_error(layer, dense, x), rel=1e-4)
    # without the bound, the exact error over every row
    monkeypatch.setattr(gram_mod, "SAMPLE_ROWS", 1024)
    layer = copy.deepcopy(dense)
    rep = nmsparse.prune(nn.Sequential(layer), 2, 4, method=method, calib=batches, keep_dense=())
    assert rep.results["0.weight"].error_after == pytest.approx(_error(layer, dense, x), rel=1e-4)


def test_wanda_holds_no_gram_matrix(monkeypatch):
    seen = []
    orig = calibration.Gram.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(self)

    monkeypatch.setattr(calibration.Gram, "__init__", init)
    model, batches, _ = build("bert")
    nmsparse.prune(model, 2, 4, method="wanda", calib=batches, keep_dense=())
    assert seen and all(g.H is None and g.norms is not None for g in seen)
    seen.clear()
    nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, keep_dense=())
    assert seen and all(g.H is not None and g.norms is None for g in seen)
