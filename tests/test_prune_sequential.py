"""Sequential (block-by-block) calibration gives the very same pruned weights as whole-model passes,
on every model family of the model zoo (and two-block variants of the transformers, where the next
block's inputs come from the pruned block); models without blocks fall back, reported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.calibration import sequential as seq
from tests.test_model_zoo import CASES, build, call

METHODS = [nmsparse.Magnitude(), nmsparse.Wanda(), nmsparse.SparseGPT(), nmsparse.AdaPrune(),
           nmsparse.AdaPrune(solver="adam", iterations=20, batch_size=1)]


def _two_blocks(case: str):
    """The zoo case with two blocks (or layers) where its config allows."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, batches, _ = CASES[case]()
    cfg = getattr(model, "config", None)
    if cfg is None:
        return model, batches
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 2)
    torch.manual_seed(0)
    return type(model)(cfg) if case != "vit" else t.ViTModel(cfg, add_pooling_layer=False), batches


def _same_prune(model, batches, method, **kw):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = nmsparse.prune(a, 2, 4, method=method, calib=batches, keep_dense=(), sequential=False, **kw)
    rb = nmsparse.prune(b, 2, 4, method=method, calib=batches, keep_dense=(), sequential=True, **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert {k: (r.error_before, r.error_after, r.rows) for k, r in ra.results.items()} == \
        {k: (r.error_before, r.error_after, r.rows) for k, r in rb.results.items()}
    return rb


@pytest.mark.parametrize("method", METHODS, ids=lambda o: type(o).__name__ + getattr(o, "solver", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_on_every_zoo_model(case, method):
    model, batches, _ = build(case)
    rep = _same_prune(model, batches, method)
    assert "sequential" in rep.settings


BLOCKED = {"bert": "encoder.layer", "gpt2": "transformer.h", "llama_tied": "model.layers",
           "llama_untied": "model.layers", "vit": "layers", "torch_encoder": "layers"}


@pytest.mark.parametrize("case", list(BLOCKED))
def test_two_blocks_run_block_by_block(case):
    model, batches = _two_blocks(case)
    rep = _same_prune(model, batches, nmsparse.SparseGPT())
    assert rep.settings["sequential"]["blocks"] == {BLOCKED[case]: 2}, rep.settings["sequential"]


NO_BLOCKS = {"whole_model": {"model": seq.NO_BLOCKS}, "blocks": {}}


def test_t5_blocks_differ_and_fall_back():
    """T5's first block holds the relative position bias: its blocks are not identical."""
    model, batches = _two_blocks("t5")
    rep = _same_prune(model, batches, nmsparse.Wanda())
    assert rep.settings["sequential"] == NO_BLOCKS


def test_models_without_blocks_fall_back():
    model, batches, _ = build("cnn")
    rep = _same_prune(model, batches, nmsparse.SparseGPT())
    assert rep.settings["sequential"] == NO_BLOCKS


class Chain(nn.Module):
    """Identical blocks, but block 1 reads block 0's input, not its output: not replayable."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.blocks[0](x)
        z = self.blocks[1](x * 2)
        return self.head(y + z)


class Twice(nn.Module):
    """Block 0 is called twice: not one call per block."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](self.blocks[0](x)))


@pytest.mark.parametrize("cls,why", [(Chain, "neither the previous block's output"), (Twice, "not called once each")])
def test_unreplayable_blocks_fall_back_with_the_reason(cls, why):
    torch.manual_seed(0)
    model = cls()
    batches = [torch.randn(4, 8) for _ in range(2)]
    rep = _same_prune(model, batches, nmsparse.SparseGPT())
    assert rep.settings["sequential"]["blocks"] == {}
    assert why in rep.settings["sequential"]["whole_model"]["blocks"]


@pytest.mark.parametrize("name,path", [("vit", "blocks"), ("resnet", None)])
def test_training_models(name, path):
    """nmsparse.training.models: the ViT's nn.Sequential of identical blocks runs block by block; the
    ResNet's stages differ (and hold one block each: a run of one block per stage)."""
    models = pytest.importorskip("nmsparse.training.models")
    torch.manual_seed(0)
    model = models.build_model(name, image_size=8, in_channels=1, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(2)]
    rep = _same_prune(model, batches, nmsparse.SparseGPT())
    if path is not None:
        assert list(rep.settings["sequential"]["blocks"]) == [path]


def test_sequential_off_is_recorded():
    model, batches, _ = build("bert")
    rep = nmsparse.prune(model, 2, 4, method="wanda", calib=batches, sequential=False)
    assert rep.settings["sequential"] is False


def test_block_lists_take_the_outermost_identical_list():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    model = nn.Module()
    model.blocks = nn.ModuleList([Expert() for _ in range(3)])
    model.mixed = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])  # shapes differ: not blocks
    names = [k for k, v in model.named_modules() if isinstance(v, nn.Linear)]
    assert list(seq.block_lists(model, names)) == ["blocks"]


def test_outputs_of_the_pruned_model_are_finite():
    model, batches = _two_blocks("llama_untied")
    nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, keep_dense=())
    with torch.no_grad():
        assert torch.isfinite(call(model, batches[0])).all()
