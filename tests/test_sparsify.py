"""sparsify / masks / finalize: gradients of each method, layouts, schedule, state_dict, errors."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import nmsparse
from nmsparse import finalize, is_nm, layer_is_nm, masks, sparsify


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(Block(16), Block(16))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: 1 channel per group
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.odd = nn.Linear(32, 30)  # 32 inputs: fine for m=4, 30 outputs irrelevant
        self.head = nn.Linear(30, 10)  # 30 inputs: not a multiple of 4

    def forward(self, x):
        x = self.dw(self.layer1(self.stem(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1)
        return self.head(torch.relu(self.odd(torch.relu(self.fc1(x)))))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def train_steps(model, steps=3, opt_cls=torch.optim.SGD, **kw):
    opt = opt_cls(model.parameters(), lr=kw.pop("lr", 0.1), **kw)
    for _ in range(steps):
        loss = model(X).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- gradients


def _linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8).double())


@pytest.mark.parametrize("method", ["ste", "srste", "fixed"])
def test_gradient_matches_formula_numerically(method):
    decay = 0.05  # large, so the SR-STE term is clearly visible
    model = _linear_model()
    sparsify(model, 2, 4, method=method, decay=decay, keep_dense=())
    lin = model[0]
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = lin.parametrizations.weight.original
    mask = lin.parametrizations.weight[0].mask.clone()
    (model(x) * r).sum().backward()

    # dL/dW~ by central finite differences, at W~ = E * W
    wt = (w * mask).detach()
    fd = torch.zeros_like(wt)
    eps = 1e-6
    for idx in torch.cartesian_prod(torch.arange(8), torch.arange(8)).tolist():
        for sign in (1, -1):
            p = wt.clone()
            p[tuple(idx)] += sign * eps
            fd[tuple(idx)] += sign * (nn.functional.linear(x, p, lin.bias) * r).sum() / (2 * eps)
    expected = {
        "ste": fd,
        "srste": fd + decay * (~mask) * w.detach(),
        "fixed": fd * mask,
    }[method]
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=1e-8)
    if method != "fixed":
        assert (w.grad[~mask] != 0).any(), "pruned weights keep receiving gradient"


def test_srste_default_decay_is_2e_4():
    model = _linear_model()
    rep = sparsify(model, 2, 4, keep_dense=())
    assert rep.settings["method"] == "srste" and rep.settings["decay"] == 2e-4
    assert model[0].parametrizations.weight[0].decay == 2e-4


# ----------------------------------------------------------------------------- selection / layouts


def test_report_lists_every_weight_layer_with_reasons():
    model = make_net()
    rep = sparsify(model, 2, 4)
    status = {e.param: (e.sparse, e.reason) for e in rep.layers}
    assert status["stem.weight"] == (False, "first weight layer (keep_dense)")
    assert status["head.weight"] == (False, "last weight layer (keep_dense)")
    assert status["dw.weight"][0] is False and "not a multiple of m=4" in status["dw.weight"][1]
    for name in ["layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight", "fc1.weight", "odd.weight"]:
        assert status[name] == (True, "")
    text = str(rep)
    assert "dense: first weight layer" in text and "layer1.0.conv2.weight" in text


def test_dense_reason_for_bad_reduction_size_when_not_first_or_last():
    model = make_net()
    rep = sparsify(model, 2, 4, keep_dense=())
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons == {
        "stem.weight": "channels reduction axis size 3 is not a multiple of m=4",
        "dw.weight": "channels reduction axis size 1 is not a multiple of m=4",
        "head.weight": "input features size 30 is not a multiple of m=4",
    }


def test_masks_keys_and_validity_in_both_layouts():
    for layout in ("channels", "flat"):
        model = make_net()
        sparsify(model, 2, 4, layout=layout)
        train_steps(model)
        ms = masks(model)
        assert sorted(ms) == sorted(
            ["layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv1.weight",
             "layer1.1.conv2.weight", "fc1.weight", "odd.weight"]
        )
        mods = dict(model.named_modules())
        for name, mask in ms.items():
            assert mask.dtype == torch.bool
            weight = mods[name.rsplit(".", 1)[0]].weight
            assert layer_is_nm(mask, 2, 4, layout) and layer_is_nm(weight, 2, 4, layout)


def test_channels_layout_groups_input_channels_at_each_kernel_position():
    conv = nn.Conv2d(8, 4, 3)
    mid = nn.Sequential(nn.Conv2d(2, 8, 1), conv, nn.Conv2d(4, 2, 1))
    sparsify(mid, 2, 4, layout="channels")
    w = conv.weight.detach()
    for i in range(3):
        for j in range(3):
            assert is_nm(w[:, :, i, j], 2, 4, dim=1)
    assert torch.equal(masks(mid)["1.weight"], nmsparse.nm_mask(conv.parametrizations.weight.original, 2, 4, dim=1))


def test_flat_layout_groups_flattened_axis():
    conv = nn.Conv2d(4, 4, 3)  # in*k*k = 36, a multiple of 4; in = 4
    torch.manual_seed(0)
    mid = nn.Sequential(nn.Conv2d(2, 4, 1), conv, nn.Conv2d(4, 2, 1))
    sparsify(mid, 2, 4, layout="flat")
    w = conv.weight.detach()
    assert is_nm(w.reshape(4, -1), 2, 4)
    assert not is_nm(w, 2, 4, dim=1), "flat groups differ from channel groups"


def test_grouped_conv_groups_within_group_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, groups=2)  # weight (8, 8, 3, 3): 8 channels per group
    m = nn.Sequential(nn.Conv2d(1, 16, 1), conv, nn.Conv2d(8, 1, 1))
    sparsify(m, 4, 8)
    w = conv.weight.detach()
    assert w.shape == (8, 8, 3, 3) and is_nm(w, 4, 8, dim=1)
    rep = sparsify(copy.deepcopy(make_net()), 1, 16, keep_dense=())
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["layer1.0.conv2.weight"] == "channels reduction axis size 8 is not a multiple of m=16"


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d])
def test_conv1d_and_conv3d(conv):
    torch.manual_seed(0)
    k = 3
    model = nn.Sequential(conv(2, 8, k, padding=1), conv(8, 8, k, padding=1), conv(8, 2, k, padding=1))
    sparsify(model, 2, 4)
    shape = (2, 2, 6) if conv is nn.Conv1d else (2, 2, 4, 4, 4)
    model(torch.randn(*shape)).sum().backward()
    assert is_nm(model[1].weight, 2, 4, dim=1)


def test_include_exclude_and_keep_dense():
    model = make_net()
    rep = sparsify(model, 2, 4, include="layer1.*", exclude=["*.conv2"], keep_dense=())
    assert sorted(e.param for e in rep.sparse) == ["layer1.0.conv1.weight", "layer1.1.conv1.weight"]
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["fc1.weight"] == "not matched by include"
    assert reasons["layer1.0.conv2.weight"] == "matched by exclude"
    model = make_net()
    rep = sparsify(model, 2, 4, keep_dense="last")
    assert "stem.weight" not in {e.param for e in rep.sparse}  # 3 input channels: dense for its size
    assert {e.param: e.reason for e in rep.dense}["head.weight"] == "last weight layer (keep_dense)"


def test_unsupported_layers_are_reported_not_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 8)

    rep = sparsify(M(), 2, 4)
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["emb.weight"].startswith("Embedding is not supported")
    # the packed attention projection is the first weight layer, so kept dense by keep_dense
    assert reasons["attn.in_proj_weight"] == "first weight layer (keep_dense)"
    assert [e.param for e in rep.sparse] == ["attn.out_proj.weight", "a.weight", "b.weight"]


def test_nothing_sparsified_warns():
    with pytest.warns(UserWarning, match="made no layer sparse"):
        rep = sparsify(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 2, 4)
    assert rep.sparse == []


# ----------------------------------------------------------------------------- errors lose nothing


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=4, m=4), "0 < n < m"),
        (dict(n=2, m=4.0), "m must be an integer"),
        (dict(method="sste"), "method must be one of"),
        (dict(layout="rows"), "layout must be one of"),
        (dict(decay=float("nan")), "decay"),
        (dict(decay="2e-4"), "decay"),
        (dict(update_every=0), "update_every"),
        (dict(update_every=2.5), "update_every"),
        (dict(keep_dense=("first", "middle")), "keep_dense"),
        (dict(include="layer9.*"), "include pattern 'layer9.*' matches no module"),
        (dict(exclude=["fc1", "nope"]), "exclude pattern 'nope' matches no module"),
        (dict(include=[3]), "module-name patterns"),
    ],
)
def test_bad_arguments_raise_and_leave_model_untouched(kwargs, match):
    model = make_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        sparsify(model, **kwargs)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_sparsifying_twice_is_an_error():
    model = make_net()
    sparsify(model, 2, 4)
    with pytest.raises(ValueError, match="already N:M sparse; call nmsparse.finalize"):
        sparsify(model, 2, 4)


# ----------------------------------------------------------------------------- mask schedule


def _mask_of(model):
    return model.layer1[0].conv1.parametrizations.weight[0].mask.clone()


def test_mask_follows_weights_every_training_forward_but_not_in_eval():
    model = make_net()
    sparsify(model, 2, 4, method="ste")
    p = model.layer1[0].conv1.parametrizations.weight
    with torch.no_grad():
        p.original.copy_(torch.randn_like(p.original))
    model.eval()
    model(X)
    assert not torch.equal(_mask_of(model), nmsparse.nm_mask(p.original, 2, 4, dim=1)), "eval keeps the mask"
    model.train()
    with torch.no_grad():
        model(X)  # a training-mode forward under no_grad still refreshes
    assert torch.equal(_mask_of(model), nmsparse.nm_mask(p.original, 2, 4, dim=1))


def test_update_every_and_fixed():
    for method, update_every, expected_changes in (("srste", 3, [0, 3]), ("fixed", 1, [])):
        model = make_net()
        sparsify(model, 2, 4, method=method, update_every=update_every)
        p = model.layer1[0].conv1.parametrizations.weight
        changes = []
        for step in range(6):
            before = _mask_of(model)
            with torch.no_grad():
                p.original.copy_(torch.randn_like(p.original))
            model(X)
            if not torch.equal(before, _mask_of(model)):
                changes.append(step)
        assert changes == expected_changes, method
        assert int(p[0].step) == (6 if method != "fixed" else 0)


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.Adam, {}), (torch.optim.AdamW, {}), (torch.optim.RMSprop, {})])
def test_any_optimizer_trains_and_keeps_nm(opt_cls, kw):
    model = make_net()
    sparsify(model, 2, 4)
    before = model(X).detach()
    train_steps(model, steps=2, opt_cls=opt_cls, lr=1e-2, **kw)
    assert not torch.equal(model(X).detach(), before)
    assert all(layer_is_nm(m, 2, 4) for m in masks(model).values())


def test_autocast_mixed_precision():
    model = make_net()
    sparsify(model, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    g = model.fc1.parametrizations.weight.original.grad
    assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()


def test_torch_compile_matches_eager():
    model = make_net()
    sparsify(model, 2, 4)
    train_steps(model, steps=1)
    compiled = torch.compile(model)
    model.train()
    eager_train = model(X)
    compiled_train = compiled(X)
    torch.testing.assert_close(compiled_train, eager_train, rtol=1e-5, atol=1e-5)
    model.eval()
    torch.testing.assert_close(compiled(X), model(X), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- state_dict / finalize


def test_state_dict_round_trip_is_exact():
    model = make_net()
    sparsify(model, 2, 4, update_every=5)
    train_steps(model, steps=3)
    sd = model.state_dict()
    assert "layer1.0.conv1.parametrizations.weight.0.mask" in sd
    fresh = make_net(seed=7)
    sparsify(fresh, 2, 4, update_every=5)
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(masks(fresh).values(), masks(model).values()))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())
    model.eval(), fresh.eval()
    assert torch.equal(model(X), fresh(X))
    # the schedule resumes too: both update on the same future step
    model.train(), fresh.train()
    train_steps(model, 2), train_steps(fresh, 2)
    assert torch.equal(model(X), fresh(X))


def test_deepcopy_of_sparse_model_keeps_working():
    model = make_net()
    sparsify(model, 2, 4)
    clone = copy.deepcopy(model)
    train_steps(clone, steps=1)
    assert all(layer_is_nm(m, 2, 4) for m in masks(clone).values())
    model.eval()
    expected = model(X)
    finalize(clone)  # parametrize shares the injected class with copies: the original must survive
    assert torch.equal(model(X), expected) and len(masks(model)) == 6
    finalize(model)
    assert torch.equal(model(X), expected)


def test_finalize_keeps_parameter_identity_for_optimizers():
    model = make_net()
    sparsify(model, 2, 4)
    original = model.fc1.parametrizations.weight.original
    finalize(model)
    assert model.fc1.weight is original and isinstance(model.fc1.weight, nn.Parameter)
    assert type(model.fc1) is nn.Linear


@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_finalize_gives_plain_equivalent_model(layout):
    model = make_net()
    sparsify(model, 2, 4, layout=layout)
    train_steps(model, steps=3)
    model.eval()
    expected = model(X)
    final_masks = masks(model)
    finalize(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(X), expected)
    fresh = make_net(seed=5)
    fresh.load_state_dict(model.state_dict())  # strict: same keys as the original architecture
    fresh.eval()
    assert torch.equal(fresh(X), expected)
    mods = dict(fresh.named_modules())
    for name in final_masks:
        w = mods[name.rsplit(".", 1)[0]].weight
        assert layer_is_nm(w, 2, 4, layout), name
    model.train()
    train_steps(model, 1)  # a plain model again: training no longer touches masks


def test_magnitude_masks_of_dense_and_sparse_models_agree():
    dense = make_net()
    sparse = copy.deepcopy(dense)
    sparsify(sparse, 2, 4)
    a, b = nmsparse.magnitude_masks(dense, 2, 4), masks(sparse)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert nmsparse.magnitude_masks(sparse, 2, 4).keys() == b.keys()
