"""Weights shared between modules (tied embeddings): left dense by default with the reason in the
report, or, with ``shared="sparsify"``, N:M consistently for every module that uses them; never a
silent change of another layer (issue 12, defect 1)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import SADTracker, finalize, magnitude_masks, masks, prune, sparsify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IDS = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(0))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.emb(ids))))


def tied() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


def train(model: nn.Module, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(IDS).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_default_keeps_a_shared_weight_dense_and_says_why():
    model = tied()
    emb_before = model.emb.weight.detach().clone()
    rep = sparsify(model, 2, 4, keep_dense=())
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["head.weight"].startswith("shared with `emb`")
    assert "shared='sparsify'" in reasons["head.weight"]
    assert reasons["emb.weight"].endswith("shared with `head`")
    assert {e.param: e.shared_with for e in rep.layers}["head.weight"] == ("emb.weight",)
    assert [e.param for e in rep.sparse] == ["body.weight"]
    assert set(masks(model)) == {"body.weight"}
    with torch.no_grad():
        emb_out = model.emb(IDS)
    finalize(model)
    # the embedding (and so the head) is untouched and still tied
    assert torch.equal(model.emb.weight, emb_before) and model.head.weight is model.emb.weight
    assert torch.equal(model.emb(IDS), emb_out)
    assert "shared with `emb`" in rep.table()


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_default_leaves_the_shared_weight_alone(method):
    model = tied()
    emb_before = model.emb.weight.detach().clone()
    rep = prune(model, 2, 4, method=method, calib=[IDS], keep_dense=())
    assert [e.param for e in rep.sparse] == ["body.weight"]
    assert {e.param: e.reason for e in rep.dense}["head.weight"].startswith("shared with `emb`")
    assert torch.equal(model.emb.weight, emb_before) and model.head.weight is model.emb.weight
    assert "shared with `emb`" in rep.table()


def test_magnitude_masks_skip_the_shared_weight_by_default():
    assert set(magnitude_masks(tied(), 2, 4, keep_dense=())) == {"body.weight"}
    assert set(magnitude_masks(tied(), 2, 4, keep_dense=(), shared="sparsify")) == {"body.weight", "head.weight"}


def test_sparsify_shared_is_consistent_everywhere_and_round_trips():
    ref = tied()
    model = copy.deepcopy(ref)
    rep = sparsify(model, 2, 4, keep_dense=(), shared="sparsify", update_every=1)
    by = {e.param: e for e in rep.layers}
    assert by["head.weight"].sparse and by["head.weight"].note.startswith("shared with `emb`")
    assert not by["emb.weight"].sparse and "N:M there" in by["emb.weight"].reason
    assert rep.settings["shared"] == "sparsify"
    assert set(masks(model)) == {"body.weight", "head.weight"}  # the shared weight once, by its owner
    tracker = SADTracker(model)
    train(model)
    tracker.measure()
    # both users see the same N:M weight after every step
    assert torch.equal(model.emb.weight, model.head.weight)
    assert nmsparse.layer_is_nm(model.head.weight, 2, 4)
    assert int(model.head.parametrizations.weight[0].step) == 3  # once per update of W, not per user
    model.eval()
    with torch.no_grad():
        out = model(IDS)
    copy2 = copy.deepcopy(ref)
    sparsify(copy2, 2, 4, keep_dense=(), shared="sparsify")
    copy2.load_state_dict(model.state_dict())
    copy2.eval()
    assert torch.equal(copy2(IDS), out)
    finalize(copy2)
    assert copy2.emb.weight is copy2.head.weight
    assert nmsparse.layer_is_nm(copy2.emb.weight, 2, 4)
    fresh = TiedLM()
    fresh.load_state_dict(copy2.state_dict(), strict=True)
    assert torch.equal(fresh(IDS), out)


def test_srste_decay_is_added_once_for_a_shared_weight():
    grads = {}
    for method in ("ste", "srste"):
        model = tied()
        sparsify(model, 2, 4, keep_dense=(), shared="sparsify", method=method, decay=0.5)
        model.train()
        model(IDS).sum().backward()
        grads[method] = model.head.parametrizations.weight.original.grad.clone()
        p = model.head.parametrizations.weight[0]
        w = model.head.parametrizations.weight.original.detach()
    assert torch.allclose(grads["srste"] - grads["ste"], 0.5 * (~p.mask) * w, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_shared_prunes_the_one_parameter(method):
    model = tied()
    rep = prune(model, 2, 4, method=method, calib=[IDS], keep_dense=(), shared="sparsify")
    assert {e.param for e in rep.sparse} == {"body.weight", "head.weight"}
    assert model.head.weight is model.emb.weight and nmsparse.layer_is_nm(model.emb.weight, 2, 4)


def test_shared_weight_follows_its_owner_when_the_owner_stays_dense():
    rep = sparsify(tied(), 2, 4, shared="sparsify")  # keep_dense: head is the last weight layer
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["head.weight"] == "last weight layer (keep_dense)"
    assert reasons["emb.weight"] == "shared with `head`, which stays dense (last weight layer (keep_dense))"


def test_bad_shared_value_and_conflicting_users_are_refused():
    with pytest.raises(ValueError, match=r"shared \(what happens to a weight shared by several modules\) must be"):
        sparsify(tied(), 2, 4, shared="yes")
    with pytest.raises(ValueError, match="shared must|shared \\("):
        prune(tied(), 2, 4, method="magnitude", shared=True)

    class Twisted(nn.Module):  # one (8, 8) Parameter read as (out, in) by one layer, (in, out) by another
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.c = _conv1d(8, 8)
            self.c.weight = self.a.weight

    model = Twisted()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"shared='sparsify': the weight a.weight is shared with c.weight, which "
                                         r"reduces over another axis"):
        sparsify(model, 2, 4, keep_dense=(), shared="sparsify")
    assert not any(nmsparse.sparse_layers(model))  # refused before anything was touched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    rep = sparsify(model, 2, 4, keep_dense=())
    assert [e.param for e in rep.sparse] == ["b.weight"]


def test_shared_with_another_parametrization_is_refused():
    model = tied()
    torch.nn.utils.parametrize.register_parametrization(model.emb, "weight", _Scale())
    # the head now holds the Parameter that the embedding's parametrization holds as `original`
    with pytest.raises(ValueError, match="holds it under another parametrization"):
        sparsify(model, 2, 4, keep_dense=(), shared="sparsify")
    rep = sparsify(model, 2, 4, keep_dense=())
    assert {e.param: e.reason for e in rep.dense}["head.weight"].startswith("shared with `emb`")


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def _conv1d(nx: int, nf: int) -> nn.Module:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


def test_a_module_used_twice_is_one_module_not_sharing():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(8, 8), lin, nn.ReLU(), lin, nn.Linear(8, 8))
    rep = sparsify(model, 2, 4, keep_dense=())
    assert [e.param for e in rep.sparse] == ["0.weight", "1.weight", "4.weight"]
    assert not any(e.shared_with for e in rep.layers)
    train_x = torch.randn(5, 8)
    model(train_x).sum().backward()
    assert int(lin.parametrizations.weight[0].step) == 2  # one mask, refreshed on each call
    finalize(model)
    assert nmsparse.layer_is_nm(model[1].weight, 2, 4) and model[1] is model[3]


def test_gpt2_tied_head_stays_dense_and_the_embedding_unchanged():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    wte = model.transformer.wte.weight.detach().clone()
    ids = torch.randint(0, 64, (2, 8))
    rep = sparsify(model, 2, 4, keep_dense=())
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["lm_head.weight"].startswith("shared with `transformer.wte`")
    assert reasons["transformer.wte.weight"].endswith("shared with `lm_head`")
    assert "transformer.h.0.attn.c_attn.weight" in {e.param for e in rep.sparse}
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "wte" not in n and "lm_head" not in n], lr=0.1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    finalize(model)
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding is not zeroed
    assert model.lm_head.weight is model.transformer.wte.weight
    rep = prune(model, 2, 4, method="magnitude", keep_dense=())
    assert torch.equal(model.transformer.wte.weight, wte)
    assert {e.param: e.reason for e in rep.dense}["lm_head.weight"].startswith("shared with `transformer.wte`")
