"""The N:M pattern (nmsparse.masking.pattern): its checks and messages, and that a public call makes
exactly one :class:`NMPattern` from its entry to its end (issue 22: validate input once, at the boundary)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.masking import nm as nm_module
from nmsparse.masking.layout import layer_is_nm, layer_mask, target_is_nm, target_mask, unsupported_reason
from nmsparse.masking.nm import is_nm, nm_mask
from nmsparse.masking.pattern import NMPattern, check_nm

KINDS = "N:M means N weights kept in every group of M, e.g. n=2, m=4"


# --- the value and its checks -----------------------------------------------------------------------

def test_a_pattern_unpacks_prints_and_compares():
    p = NMPattern(2, 4)
    n, m = p
    assert (n, m) == (2, 4) and type(n) is int and type(m) is int
    assert str(p) == "2:4" and p == NMPattern(2, 4) and p != NMPattern(1, 4)
    assert hash(p) == hash(NMPattern(2, 4))
    assert pickle.loads(pickle.dumps(p)) == p
    with pytest.raises(AttributeError):
        p.n = 3  # frozen


def test_numpy_and_torch_integers_become_python_ints():
    np = pytest.importorskip("numpy")
    p = NMPattern(np.int64(1), np.int32(8))
    assert (p.n, p.m) == (1, 8) and type(p.n) is int and type(p.m) is int


@pytest.mark.parametrize("n, m, which, shown", [
    (2.0, 4, "n", "2.0 (float)"),
    (2, "4", "m", "'4' (str)"),
    (True, 4, "n", "True (bool)"),
    (2, None, "m", "None (NoneType)"),
    (None, 4, "n", "None (NoneType)"),
])
def test_a_non_integer_is_one_error_naming_it(n, m, which, shown):
    with pytest.raises(ValueError) as e:
        NMPattern(n, m)
    assert str(e.value) == f"{which} must be an integer, got {shown}; {KINDS}"


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (-1, 2), (1, 0), (1, 1)])
def test_outside_zero_below_n_below_m_is_one_error(n, m):
    with pytest.raises(ValueError) as e:
        NMPattern(n, m)
    assert str(e.value) == (f"need 0 < n < m (n = weights kept per group of m), got n={n}, m={m}; "
                            "for example n=2, m=4 keeps 2 of every 4")


@pytest.mark.parametrize("text, expect", [("2:4", (2, 4)), ("1:8", (1, 8)), (" 4 : 16 ", (4, 16))])
def test_parse(text, expect):
    assert tuple(NMPattern.parse(text)) == expect


@pytest.mark.parametrize("text", ["2/4", "2:4:8", "a:4", "2:", ":4", "-1:4", "2.0:4", "", "24"])
def test_parse_refuses_what_is_not_n_colon_m(text):
    with pytest.raises(ValueError) as e:
        NMPattern.parse(text)
    assert str(e.value) == f"an N:M pattern is written n:m (n kept in every group of m), e.g. 2:4; got {text!r}"


def test_parse_checks_the_values():
    with pytest.raises(ValueError, match=r"need 0 < n < m .* got n=4, m=4"):
        NMPattern.parse("4:4")


def test_check_nm_returns_a_pattern_as_it_is():
    p = NMPattern(2, 4)
    assert check_nm(p) is p
    assert check_nm(p, 4) is p
    assert nm_module.check_nm is check_nm
    q = check_nm(1, 4)
    assert isinstance(q, NMPattern) and tuple(q) == (1, 4)


def test_check_nm_refuses_a_pattern_with_another_m():
    with pytest.raises(ValueError) as e:
        check_nm(NMPattern(2, 4), 8)
    assert str(e.value) == "got the pattern 2:4 and a separate m=8; pass one or the other"


def test_check_nm_checks_integers():
    with pytest.raises(ValueError, match="need 0 < n < m"):
        check_nm(3, 2)
    with pytest.raises(ValueError, match="m must be an integer, got None"):
        check_nm(2)


# --- a pattern where n, m are taken --------------------------------------------------------------------

def test_mask_functions_take_a_pattern_as_n():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    p = NMPattern(2, 4)
    assert torch.equal(nm_mask(w, p), nm_mask(w, 2, 4))
    assert torch.equal(nm_mask(w.t(), p, None, 0), nm_mask(w.t(), 2, 4, 0))  # dim stays 4th, positionally
    assert torch.equal(nm_mask(w.t(), p, dim=0), nm_mask(w.t(), 2, 4, dim=0))
    assert is_nm(w * nm_mask(w, p), p) and not is_nm(w, p)
    conv = nn.Conv2d(8, 4, 3)
    for layout in ("channels", "flat"):
        assert torch.equal(layer_mask(conv.weight, p, layout=layout), layer_mask(conv.weight, 2, 4, layout))
        assert layer_is_nm(conv.weight * layer_mask(conv.weight, p, layout=layout), p, layout=layout)
    lin = nn.Linear(16, 8)
    assert torch.equal(target_mask(lin.weight, lin, "weight", p), target_mask(lin.weight, lin, "weight", 2, 4))
    assert target_is_nm(lin.weight * target_mask(lin.weight, lin, "weight", p), lin, "weight", p)
    assert unsupported_reason(nn.Linear(6, 8), p) == "input features size 6 is not a multiple of m=4"
    assert unsupported_reason(lin, p, layout="channels", transposable=True) is None
    assert nmsparse.mask_diversity("nm", (4, 8), p) == nmsparse.mask_diversity("nm", (4, 8), 2, 4)
    assert nmsparse.transposable_count(p) == 90


def test_public_calls_take_a_pattern():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(8, 16)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = nmsparse.prune(a, NMPattern(2, 4), method="wanda", calib=[x])
    rb = nmsparse.prune(b, 2, 4, method="wanda", calib=[x])
    assert (ra.n, ra.m) == (2, 4) and type(ra.n) is int
    assert ra.to_dict()["results"].keys() == rb.to_dict()["results"].keys()
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    c = copy.deepcopy(model)
    rep = nmsparse.sparsify(c, NMPattern(1, 8))
    assert (rep.n, rep.m) == (1, 8)
    assert nmsparse.sparsify(copy.deepcopy(model)).m == 4  # the 2:4 default is kept
    with pytest.raises(ValueError, match="got the pattern 2:4 and a separate m=8"):
        nmsparse.prune(copy.deepcopy(model), NMPattern(2, 4), 8, method="magnitude")


# --- one pattern per public call --------------------------------------------------------------------------

def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture
def made(monkeypatch):
    """The list of patterns constructed (validated) while the test runs."""
    seen: list[tuple] = []
    original = NMPattern.__post_init__

    def counting(self):
        original(self)
        seen.append((self.n, self.m))

    monkeypatch.setattr(NMPattern, "__post_init__", counting)
    return seen


def test_the_counter_counts(made):
    NMPattern(2, 4)
    check_nm(1, 4)
    check_nm(NMPattern(1, 8))
    assert made == [(2, 4), (1, 4), (1, 8)]


def test_prune_sparsegpt_permuted_makes_one_pattern(made):
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.randn(32, 16)
    rep = nmsparse.prune(model, 2, 4, method="sparsegpt", calib=[x], keep_dense=(), permute=True)
    assert rep.permutation is not None and rep.sparse  # the permutation search and pruning ran
    assert made == [(2, 4)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "adaprune"])
def test_prune_permuted_makes_one_pattern_for_every_method(made, method):
    torch.manual_seed(1)
    model = _tiny().eval()
    nmsparse.prune(model, 2, 4, method=method, calib=[torch.randn(32, 16)], keep_dense=(), permute=True)
    assert made == [(2, 4)]


def test_sparsify_makes_one_pattern(made):
    model = _tiny()
    rep = nmsparse.sparsify(model, 2, 4)
    model(torch.randn(4, 16))  # a training-mode pass recomputes the masks
    assert rep.sparse and made == [(2, 4)]


def test_magnitude_masks_make_one_pattern(made):
    masks = nmsparse.magnitude_masks(_tiny(), 2, 4)
    assert masks and made == [(2, 4)]


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_transposable_makes_one_pattern(made, method):
    model = _tiny()
    calib = [torch.randn(32, 16, generator=torch.Generator().manual_seed(3))] if method != "magnitude" else None
    rep = nmsparse.prune(model, 2, 4, method=method, calib=calib, transposable=True, keep_dense=())
    assert rep.sparse and made == [(2, 4)]


def test_sparsify_transposable_makes_one_pattern(made):
    model = _tiny()
    rep = nmsparse.sparsify(model, 2, 4, transposable=True, keep_dense=())
    model(torch.randn(4, 16))
    assert rep.sparse and made == [(2, 4)]


def test_permute_channels_makes_one_pattern(made):
    torch.manual_seed(2)
    x = torch.randn(16, 16)
    nmsparse.permute_channels(_tiny().eval(), 2, 4, example_inputs=x, calib=[x], keep_dense=(), method="wanda")
    assert made == [(2, 4)]
