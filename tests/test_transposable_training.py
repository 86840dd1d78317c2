"""sparsify(transposable=True): masks of Linear and conv layers stay transposable N:M through training
(STE and SR-STE, both mask methods), the schedule, the report's reasons, and argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse import finalize, is_nm, masks, sparse_layers, sparsify, transposable_layer_mask
from nmsparse.masking.layout import matrices_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)  # 8 out / 8 in per group
        self.conv1d_like = nn.Conv2d(16, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 16)
        self.odd = nn.Linear(16, 12)  # 12 outputs: not a multiple of 8
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.conv1d_like(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1)
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.head(torch.relu(self.odd(x)))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))


def step(model, opt):
    loss = nn.functional.cross_entropy(model(X), Y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def assert_transposable(t: torch.Tensor, n: int, m: int, layout: str, exact: bool) -> None:
    """``t`` and its transpose N:M: at most (or, for a mask, exactly) n per row and column of every
    aligned m x m tile of each (out, in) matrix of the layer."""
    mats = matrices_of(t, layout) != 0
    assert is_nm(mats, n, m, dim=2) and is_nm(mats, n, m, dim=1)
    assert is_nm(mats.transpose(1, 2), n, m, dim=2)
    if exact:
        k, r, c = mats.shape
        tiles = mats.reshape(k, r // m, m, c // m, m)
        assert (tiles.sum(4) == n).all() and (tiles.sum(2) == n).all()


@pytest.mark.parametrize("method", ["ste", "srste"])
@pytest.mark.parametrize("mask_method", ["approx", "optimal"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_masks_and_weights_stay_transposable_through_training(method, mask_method, n, m):
    model = make_net()
    report = sparsify(model, n, m, method=method, transposable=True, mask_method=mask_method, update_every=2)
    sparse = {e.param for e in report.sparse}
    expected = {"conv.weight", "grouped.weight", "conv1d_like.weight", "fc1.weight", "fc2.weight"}
    if m == 4:
        expected.add("odd.weight")
    assert sparse == expected
    assert report.settings["transposable"] is True and report.settings["mask_method"] == mask_method
    before = masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(8):
        step(model, opt)
        ms = masks(model)
        assert set(ms) == sparse
        for name, mod, p in sparse_layers(model):
            mask = ms[f"{name}.weight"]
            assert mask.dtype == torch.bool
            assert_transposable(mask, n, m, "channels", exact=True)
            assert_transposable(mod.weight.detach(), n, m, "channels", exact=False)  # effective weight E * W
            assert p.transposable
    changed = sum(int((before[k] != v).sum()) for k, v in masks(model).items())
    assert changed > 0  # the masks were recomputed from the trained weights


def test_mask_is_recomputed_from_the_dense_weight_on_schedule():
    model = make_net()
    sparsify(model, 2, 4, method="ste", transposable=True, mask_method="optimal", update_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    name, mod, p = next(sparse_layers(model))
    for t in range(7):
        dense = mod.parametrizations["weight"].original.detach().clone()
        old = p.mask.clone()
        step(model, opt)  # one training forward: refresh happens before it when t % 3 == 0
        if t % 3 == 0:
            assert torch.equal(p.mask, transposable_layer_mask(dense, 2, 4, "optimal"))
        else:
            assert torch.equal(p.mask, old)
    assert int(p.step) == 7


def test_flat_layout_and_finalize():
    model = make_net()
    sparsify(model, 2, 4, method="srste", transposable=True, layout="flat", update_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(3):
        step(model, opt)
    for name, mod, _ in sparse_layers(model):
        assert_transposable(masks(model)[f"{name}.weight"], 2, 4, "flat", exact=True)
    out = model.eval()(X)
    finalize(model)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    assert torch.allclose(model(X), out)
    for mod in (model.conv, model.grouped, model.fc1, model.fc2):
        assert_transposable(mod.weight.detach(), 2, 4, "flat", exact=False)


def test_layers_whose_outputs_do_not_tile_stay_dense_with_reason():
    model = make_net()
    report = sparsify(model, 4, 8, transposable=True)
    reasons = {e.param: e.reason for e in report.dense}
    assert "odd.weight" in reasons and "output features 12 is not a multiple of m=8" in reasons["odd.weight"]
    assert reasons["stem.weight"].startswith("first")
    # grouped conv: 32 out channels in 4 groups = 8 per group (16 inputs per group); m=16 tiles would
    # straddle two groups although 32 is a multiple of 16
    grouped = nn.Sequential(nn.Linear(16, 64), nn.Conv2d(64, 32, 1, groups=4), nn.Linear(32, 16), nn.Linear(16, 2))
    report = sparsify(copy.deepcopy(grouped), 1, 8, transposable=True, keep_dense=())
    assert {e.param for e in report.sparse} == {"0.weight", "1.weight", "2.weight"}  # 3.weight: 2 outputs
    report = sparsify(copy.deepcopy(grouped), 2, 16, transposable=True, keep_dense=())
    reasons = {e.param: e.reason for e in report.dense}
    assert "output channels per group 8 is not a multiple of m=16" in reasons["1.weight"]
    assert {e.param for e in report.sparse} == {"0.weight", "2.weight"}
    # without transposable the same layers are fine
    plain = sparsify(nn.Sequential(nn.Linear(16, 12), nn.Linear(16, 2)), 4, 8, keep_dense=())
    assert len(plain.sparse) == 2


def test_grouped_conv_masks_are_transposable_within_groups():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, groups=2, padding=1), nn.Conv2d(32, 16, 1))
    sparsify(model, 2, 4, transposable=True, keep_dense=(), mask_method="optimal")
    mask = masks(model)["0.weight"]  # (32, 8, 3, 3): 16 outputs per group
    assert_transposable(mask, 2, 4, "channels", exact=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(transposable="yes"), "transposable must be True or False"),
        (dict(transposable=True, mask_method="exact"), "mask_method"),
        (dict(mask_method=None), "mask_method"),
        (dict(transposable=True, mask_fn=lambda w: w != 0), "mask_fn"),
    ],
)
def test_bad_arguments_are_rejected_before_touching_the_model(kwargs, match):
    model = make_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        sparsify(model, 2, 4, **kwargs)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_state_dict_round_trip_keeps_transposable_masks():
    model = make_net()
    sparsify(model, 2, 4, transposable=True, update_every=40)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(2):
        step(model, opt)
    fresh = make_net(seed=5)
    sparsify(fresh, 2, 4, transposable=True, update_every=40)
    fresh.load_state_dict(model.state_dict())
    for k, v in masks(model).items():
        assert torch.equal(masks(fresh)[k], v)
    assert torch.allclose(fresh.eval()(X), model.eval()(X))
