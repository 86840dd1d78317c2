"""The network-level acceptance rule of channel permutations (``accept="network"``, the rule of
``prune(permute=True)``): checked against the pruned networks built independently (permute a copy,
prune it with ``nmsparse.prune``, compare its outputs with the dense model's in plain torch)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmsparse
from nmsparse.permute import channels
from nmsparse.permute.search import SearchResult, kept


def _rel(model, dense, x) -> float:
    """Relative squared output error of ``model`` against ``dense`` on ``x``, in plain torch."""
    with torch.no_grad():
        y, r = model(x).double(), dense(x).double()
    return float((y - r).pow(2).sum() / r.pow(2).sum())


def _random_search(rows, n, m, *, search, escapes, seed):
    """A stand-in search: a random permutation per seed (what it proposes is what the rules judge)."""
    perm = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(seed))
    return SearchResult(perm, kept(rows, None, n, m), kept(rows, perm, n, m), False, 1, 0.0)


def _pruned(model, method="magnitude", x=None):
    out = copy.deepcopy(model)
    nmsparse.prune(out, 2, 4, method=method, calib=None if x is None else [x], keep_dense=())
    return out


def test_network_rule_rejects_a_permutation_the_layerwise_rule_accepts(monkeypatch):
    """The hidden space of a 2-layer MLP: a permutation that lowers the second layer's own output
    error on its dense inputs, but raises the whole pruned network's error (the first layer is
    pruned too, so the second sees other inputs). The layer-wise rule applies it; the network rule
    does not, and its figures are the independently measured ones."""
    monkeypatch.setattr(channels, "search_permutation", _random_search)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(32, 8)
    layerwise = copy.deepcopy(model)
    rep_e = nmsparse.permute_channels(layerwise, 2, 4, example_inputs=x, calib=[x], keep_dense=(),
                                      accept="error", seed=4)
    sp = next(s for s in rep_e.spaces if s.searched)
    assert rep_e.permuted and sp.error_after < sp.error_before  # the layer-wise rule accepts it
    plain = _rel(_pruned(model), model, x)
    assert _rel(_pruned(layerwise), model, x) > plain  # ... and the pruned network gets worse
    net = copy.deepcopy(model)
    rep_n = nmsparse.permute_channels(net, 2, 4, example_inputs=x, calib=[x], keep_dense=(),
                                      accept="network", seed=4)
    assert not rep_n.permuted and all(torch.equal(a, b) for a, b in zip(net.parameters(), model.parameters()))
    sp = next(s for s in rep_n.spaces if s.searched)
    assert sp.rejected and sp.network_before == pytest.approx(plain, rel=1e-5)
    assert sp.network_after == pytest.approx(_rel(_pruned(layerwise), model, x), rel=1e-5)
    row = next(e for e in rep_n.layers if e.param == "2.weight")
    assert row.status == "rejected" and "pruned network's calibration output error" in row.reason
    assert rep_n.settings["network"]["permuted"] == rep_n.settings["network"]["unpermuted"]
    assert "pruned network's relative calibration output error" in rep_n.table()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]))
def test_prune_permute_magnitude_never_worse_on_calibration_data(seed, nm):
    """With the real search: the network ``prune(permute=True)`` returns has a calibration output
    error (measured here) at most that of ``prune(permute=False)``, and equal to what the rule
    recorded (the network it judged is the one magnitude pruning makes)."""
    n, m = nm
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                mod.weight.mul_(torch.randn(mod.weight.shape).pow(2))  # outliers: something to gain
    x = torch.randn(48, 8)
    plain, perm = copy.deepcopy(model), copy.deepcopy(model)
    nmsparse.prune(plain, n, m, method="magnitude", calib=[x], keep_dense=())
    rep = nmsparse.prune(perm, n, m, method="magnitude", calib=[x], keep_dense=(), permute=True)
    net = rep.permutation.settings["network"]
    e_plain, e_perm = _rel(plain, model, x), _rel(perm, model, x)
    assert net["unpermuted"] == pytest.approx(e_plain, rel=1e-4, abs=1e-9)
    assert net["permuted"] == pytest.approx(e_perm, rel=1e-4, abs=1e-9)
    assert e_perm <= e_plain * (1 + 1e-5) + 1e-9
    assert rep.permutation.settings["accept"] == "network"


def test_guard_keeps_the_better_pruned_network_for_adaprune(monkeypatch):
    """AdaPrune re-solves the kept weights, so the network the rule judged is not the one returned:
    ``prune(permute=True)`` prunes the unpermuted model too and keeps whichever pruned network has
    the lower calibration output error. Forced to accept every (random) permutation, the result
    is, seed by seed, the better of the two independently pruned networks, and both cases occur."""
    monkeypatch.setattr(channels, "search_permutation", _random_search)

    def accept_all(objective, layers, space_layers, candidates, n, m, layout):
        chosen = {sid: c[0] for sid, c in candidates.items()}
        return chosen, {sid: (0.0, 0.0) for sid in chosen}, 0.0, 0.0

    monkeypatch.setattr(channels, "accept_greedy", accept_all)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                mod.weight.mul_(torch.randn(mod.weight.shape).pow(2))
    x = torch.randn(40, 8)
    plain = _pruned(model, "adaprune", x)
    e_plain = _rel(plain, model, x)
    kept_as = set()
    for seed in range(6):
        forced = copy.deepcopy(model)
        nmsparse.permute_channels(forced, 2, 4, example_inputs=x, calib=[x], keep_dense=(), accept="network",
                                  seed=seed)
        e_forced = _rel(_pruned(forced, "adaprune", x), model, x)
        out = copy.deepcopy(model).train()
        rep = nmsparse.prune(out, 2, 4, method="adaprune", calib=[x], keep_dense=(), permute=True, seed=seed)
        assert out.training  # the mode it had
        check = rep.permutation.settings["pruned_check"]
        assert check["permuted"] == pytest.approx(e_forced, rel=1e-4)
        assert check["unpermuted"] == pytest.approx(e_plain, rel=1e-4)
        assert _rel(out.eval(), model, x) == pytest.approx(min(e_forced, e_plain), rel=1e-4)
        kept_as.add(check["kept"])
        if check["kept"] == "unpermuted":
            assert all(torch.equal(a, b) for a, b in zip(out.parameters(), plain.parameters()))
            assert not rep.permutation.permuted
            assert all("the unpermuted result was kept" in e.reason for e in rep.permutation.layers
                       if e.status == "rejected")
            assert rep.permutation.total()[0] == rep.permutation.total()[1]
    assert kept_as == {"permuted", "unpermuted"}


def test_network_rule_needs_calibration_data():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="accept='network' needs calib"):
        nmsparse.permute_channels(model, 2, 4, example_inputs=torch.randn(2, 8), accept="network")
