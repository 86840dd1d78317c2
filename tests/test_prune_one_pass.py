"""``prune(..., sequential="block")``: one calibration run per block (all of its layers from the block's
cached inputs, the unpruned block), then the pruned block is run once for the next block's inputs.
Checked against an independent layer-by-layer reference, against the other modes where they must agree,
on every model family of the model zoo, and by the number of block runs it saves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.calibration import sequential as seq
from tests.test_model_zoo import CASES, SPARSE_COUNT, build, call, check_nm
from tests.test_prune_sequential import BLOCKED, _two_blocks

METHODS = [nmsparse.Wanda(), nmsparse.SparseGPT(), nmsparse.AdaPrune()]
IDS = ["wanda", "sparsegpt", "adaprune"]


class MLPBlock(nn.Module):
    def __init__(self, d: int = 16, h: int = 32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([MLPBlock() for _ in range(blocks)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _batches(d: int = 16):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(5, d, generator=g) for _ in range(3)]


def _reference(model: Stack, batches, method) -> None:
    """One pass per block by hand: each Linear pruned on its own by nmsparse.prune from its inputs in the
    unpruned block (fed by the already-pruned earlier blocks), then the pruned block advances the inputs."""
    xs = [b.clone() for b in batches]
    for block in model.blocks:
        with torch.no_grad():
            hidden = [torch.relu(block.fc1(x)) for x in xs]
        nmsparse.prune(nn.Sequential(block.fc1), 2, 4, method=method, calib=xs, keep_dense=())
        nmsparse.prune(nn.Sequential(block.fc2), 2, 4, method=method, calib=hidden, keep_dense=())
        with torch.no_grad():
            xs = [block(x) for x in xs]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_one_pass_equals_the_layer_by_layer_reference(method):
    torch.manual_seed(0)
    model = Stack()
    ref = copy.deepcopy(model)
    rep = nmsparse.prune(model, 2, 4, method=method, calib=_batches(), keep_dense=(), sequential="block")
    _reference(ref, _batches(), method)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert rep.settings["sequential"] == {"mode": "block", "blocks": {"blocks": 3}, "whole_model": {}}


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_one_pass_differs_from_per_group_runs_where_it_should(method):
    """sequential=True calibrates fc2 on the pruned fc1's output, "block" on the dense fc1's."""
    torch.manual_seed(0)
    a = Stack()
    b = copy.deepcopy(a)
    nmsparse.prune(a, 2, 4, method=method, calib=_batches(), keep_dense=(), sequential="block")
    nmsparse.prune(b, 2, 4, method=method, calib=_batches(), keep_dense=(), sequential=True)
    assert torch.equal(a.blocks[0].fc1.weight, b.blocks[0].fc1.weight)  # its inputs are the same
    if not isinstance(method, nmsparse.Wanda):  # Wanda's masks may agree: its scores move little
        assert not torch.equal(a.blocks[0].fc2.weight, b.blocks[0].fc2.weight)


class LinearStack(nn.Module):
    """One Linear per block: every mode calibrates each layer on the same inputs."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_one_layer_per_block_all_modes_agree(method):
    torch.manual_seed(0)
    base = LinearStack()
    states, reps = [], []
    for mode in (False, True, "block"):
        model = copy.deepcopy(base)
        reps.append(nmsparse.prune(model, 2, 4, method=method, calib=_batches(), keep_dense=(), sequential=mode))
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]) and torch.equal(states[0][k], states[2][k]), k
    fields = [{k: (r.error_before, r.error_after, r.rows) for k, r in rep.results.items()} for rep in reps]
    assert fields[0] == fields[1] == fields[2]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_zoo_model(case, method):
    model, batches, expect = build(case)
    rep = nmsparse.prune(model, 2, 4, method=method, calib=batches, keep_dense=(), sequential="block")
    assert len(rep.sparse) == SPARSE_COUNT[case]
    check_nm(model, rep)
    assert rep.settings["sequential"]["mode"] == "block"
    if not rep.settings["sequential"]["blocks"]:  # fallback: today's whole-model passes, the same bits
        ref, _, _ = build(case)
        nmsparse.prune(ref, 2, 4, method=method, calib=batches, keep_dense=(), sequential=True)
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert rep.settings["sequential"]["whole_model"]
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(call(model, batches[0])).all()


def _block_runs(model, path: str, batches, mode) -> int:
    blocks = dict(model.named_modules())[path]
    calls = []
    handles = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in blocks]
    try:
        rep = nmsparse.prune(model, 2, 4, method="wanda", calib=batches, keep_dense=(), sequential=mode)
    finally:
        for h in handles:
            h.remove()
    assert rep.settings["sequential"]["blocks"] == {path: len(blocks)}
    return len(calls)


@pytest.mark.parametrize("case", ["bert", "llama_untied", "vit"])
def test_one_pass_runs_each_block_once_to_calibrate(case):
    """sequential=True runs a block once per layer group (4 here: q/k/v, the attention's output, the
    MLP's first Linear(s), its last) and batch to calibrate it; "block" runs it once per batch. The
    other runs (ordering, capture, advance) are the same in both modes."""
    model, batches = _two_blocks(case)
    one = _block_runs(copy.deepcopy(model), BLOCKED[case], batches, "block")
    per_group = _block_runs(copy.deepcopy(model), BLOCKED[case], batches, True)
    blocks, groups = 2, 4
    assert per_group - one == len(batches) * blocks * (groups - 1)


def test_unreplayable_blocks_fall_back_with_the_reason():
    from tests.test_prune_sequential import Twice

    torch.manual_seed(0)
    model = Twice()
    ref = copy.deepcopy(model)
    batches = [torch.randn(4, 8) for _ in range(2)]
    rep = nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, keep_dense=(), sequential="block")
    nmsparse.prune(ref, 2, 4, method="sparsegpt", calib=batches, keep_dense=(), sequential=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert rep.settings["sequential"]["blocks"] == {}
    assert "not called once each" in rep.settings["sequential"]["whole_model"]["blocks"]


def test_models_without_blocks_say_so():
    model, batches, _ = build("cnn")
    rep = nmsparse.prune(model, 2, 4, method="wanda", calib=batches, keep_dense=(), sequential="block")
    assert rep.settings["sequential"] == {"mode": "block", "blocks": {}, "whole_model": {"model": seq.NO_BLOCKS}}


def test_block_reconstruction_works_with_one_pass():
    torch.manual_seed(0)
    model = Stack(2)
    rep = nmsparse.prune(model, 2, 4, method="wanda", calib=_batches(), keep_dense=(), sequential="block",
                         reconstruct=nmsparse.BlockReconstruct(steps=5))
    assert set(rep.settings["reconstruct"]["blocks"]) == {"blocks.0", "blocks.1"}
    for b in model.blocks:
        for lin in (b.fc1, b.fc2):
            assert ((lin.weight.reshape(lin.weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
