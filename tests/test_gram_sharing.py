"""Layers that read the very same input tensor share one Gram matrix (nmsparse.calibration.collect.collect,
share=True): found from the data flow, computed once, and giving bit for bit the results of one Gram per
layer, in whole-model and block-wise pruning."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.calibration import collect as calibration
from nmsparse.calibration.geometry import LayerGeometry

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Net(nn.Module):
    """q/k/v and a narrower bias-free layer read one tensor; gate/up read another; ``route`` makes k read a
    copy of q's input on batches of 5 samples (data-dependent flow)."""

    def __init__(self, route: bool = False):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.side = nn.Linear(16, 8, bias=False)  # same input, other key (no bias): its own Gram
        self.gate, self.up = nn.Linear(56, 24, bias=False), nn.Linear(56, 24, bias=False)
        self.down = nn.Linear(24, 4)
        self.route = route

    def forward(self, x):
        h = torch.relu(self.inp(x))
        hk = h.clone() if self.route and x.shape[0] == 5 else h
        a = torch.cat([self.q(h), self.k(hk), self.v(h), self.side(h)], -1)
        return self.down(torch.relu(self.gate(a)) * self.up(a))


def batches(sizes=(6, 6, 6)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, 8, generator=g) for s in sizes]


@pytest.fixture
def count_adds(monkeypatch):
    calls = []
    orig = calibration.Gram.add

    def add(self, f, bin_index=None):
        calls.append(self.d)
        return orig(self, f, bin_index)

    monkeypatch.setattr(calibration.Gram, "add", add)
    return calls


def _run(model, method, calib, **kw):
    rep = nmsparse.prune(model, 2, 4, method=method, calib=calib, keep_dense=(), **kw)
    return rep, model.state_dict()


@pytest.mark.parametrize("method,kw", [("sparsegpt", {}), ("wanda", {}), ("adaprune", {}),
                                        ("adaprune", dict(solver="adam", iterations=20, batch_size=4))])
def test_sharing_is_bit_identical_and_happens(method, kw, count_adds, monkeypatch):
    torch.manual_seed(0)
    base = Net()
    rep, shared = _run(copy.deepcopy(base), method, batches(), **kw)
    n_shared = len(count_adds)
    count_adds.clear()
    monkeypatch.setattr(calibration, "share_key", lambda geom: None)  # one Gram per layer, as before
    ref, alone = _run(copy.deepcopy(base), method, batches(), **kw)
    n_alone = len(count_adds)
    for k in alone:
        assert torch.equal(shared[k], alone[k]), k
    for k in ref.results:
        for f in ("kept_abs", "error_before", "error_after", "rows"):
            assert getattr(rep.results[k], f) == getattr(ref.results[k], f), (k, f)
    # per batch: alone 8 layers = 8 accumulations; shared: inp, q (for k, v), side, gate (for up), down
    per_batch = 2 if kw.get("solver") == "adam" else 1  # Adam: batches of 6 cut into bins of 4 samples
    assert n_alone == 8 * 3 * per_batch
    assert n_shared == 5 * 3 * per_batch


def test_collect_shares_collectors_found_from_data_flow():
    net = Net()
    names = ["q", "k", "v", "side", "gate", "up"]
    mods = dict(net.named_modules())
    cols = {k: calibration.LayerCollector(LayerGeometry(mods[k], "channels"), torch.device("cpu")) for k in names}
    calibration.collect(net, cols, batches(), share=True)
    assert cols["k"] is cols["q"] and cols["v"] is cols["q"] and cols["up"] is cols["gate"]
    assert cols["side"] is not cols["q"] and cols["gate"] is not cols["q"]
    assert calibration.forward_order(net, {k: mods[k] for k in names}, batches()) == [
        ["q", "k", "v", "side"], ["gate", "up"]]
    # without share=True nothing is shared
    cols = {k: calibration.LayerCollector(LayerGeometry(mods[k], "channels"), torch.device("cpu")) for k in names}
    calibration.collect(net, cols, batches())
    assert len({id(c) for c in cols.values()}) == len(names)


def test_flow_that_changes_between_batches_falls_back_to_one_gram_per_layer(count_adds, monkeypatch):
    torch.manual_seed(0)
    base = Net(route=True)
    calib = batches((6, 5, 6))  # batch 1: k reads a copy, not q's tensor
    mods = dict(base.named_modules())
    cols = {k: calibration.LayerCollector(LayerGeometry(mods[k], "channels"), torch.device("cpu"))
            for k in ("q", "k", "v")}
    with pytest.raises(calibration.ShareMismatch, match="layer k shares its input with None on batch 1"):
        calibration.collect(base, cols, calib, share=True)
    rep, shared = _run(copy.deepcopy(base), "sparsegpt", calib)
    monkeypatch.setattr(calibration, "share_key", lambda geom: None)
    ref, alone = _run(copy.deepcopy(base), "sparsegpt", calib)
    for k in alone:
        assert torch.equal(shared[k], alone[k]), k


def test_blockwise_llama_shares_qkv_and_gate_up(tmp_path, count_adds, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from nmsparse.pruning.blockwise import prune_pretrained

    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "in")
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 120, (2, 16), generator=g) for _ in range(3)]
    prune_pretrained(tmp_path / "in", tmp_path / "out", 2, 4, method="sparsegpt", calib=calib, keep_dense=())
    # per block and batch: q/k/v -> 1, o -> 1, gate/up -> 1, down -> 1 (instead of 7)
    assert len(count_adds) == 2 * 3 * 4
    count_adds.clear()
    monkeypatch.setattr(calibration, "share_key", lambda geom: None)
    whole = copy.deepcopy(model)
    nmsparse.prune(whole, 2, 4, method="sparsegpt", calib=calib, keep_dense=(), exclude=["lm_head"])
    assert len(count_adds) == 2 * 3 * 7
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    sw, sb = whole.state_dict(), back.state_dict()
    for k in sw:
        assert torch.equal(sw[k], sb[k]), k
