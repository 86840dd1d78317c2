"""Channel permutations: the search against brute force, the graph analysis and the application
against the model's own outputs, prune(permute=True) and ``nmsparse prune --permute``."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmsparse
from nmsparse import permute as P
from nmsparse.masking.nm import nm_mask
from nmsparse.training.models import build_model


# -- the search --------------------------------------------------------------------------------------
def _partitions(items: list[int], m: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, m - 1):
        left = [c for c in rest if c not in others]
        for tail in _partitions(left, m):
            yield [first, *others, *tail]


def _brute(score, n, m) -> float:
    return max(P.kept(score, torch.tensor(p), n, m) for p in _partitions(list(range(score.shape[1])), m))


def _kept_ref(score, perm, n, m) -> float:  # through the project's own mask function
    s = score[:, perm].double()
    return float((s * nm_mask(s, n, m, dim=1)).sum())


@settings(max_examples=15, deadline=None)
@given(c=st.sampled_from([4, 8]), n=st.integers(1, 3), rows=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_exact_search_equals_brute_force(c, n, rows, seed):
    score = torch.rand(rows, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = P.search_permutation(score, n, 4, search="exact")
    assert r.exact
    assert r.after == pytest.approx(_brute(score, n, 4), rel=1e-12)
    assert r.after == pytest.approx(_kept_ref(score, r.perm, n, 4), rel=1e-12)
    assert sorted(r.perm.tolist()) == list(range(c))


@pytest.mark.parametrize("c, n, m", [(12, 2, 4), (16, 4, 8)])
def test_exact_search_equals_brute_force_larger(c, n, m):
    score = torch.rand(5, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3
    r = P.search_permutation(score, n, m, search="exact")
    assert r.after == pytest.approx(_brute(score, n, m), rel=1e-12)


@settings(max_examples=12, deadline=None)
@given(c=st.sampled_from([8, 16, 24]), m=st.sampled_from([4, 8]), rows=st.integers(1, 12),
       seed=st.integers(0, 10**6), heavy=st.booleans())
def test_local_search_never_loses_and_stays_below_the_optimum(c, m, rows, seed, heavy):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(rows, c, generator=g, dtype=torch.float64).abs()
    if heavy:
        score = score ** 4  # outlier channels: where permutations gain most
    n = m // 2
    r = P.search_permutation(score, n, m, search="local", escapes=10, seed=seed)
    assert r.after >= r.before
    assert r.before == pytest.approx(_kept_ref(score, torch.arange(c), n, m), rel=1e-12)
    assert r.after == pytest.approx(_kept_ref(score, r.perm, n, m), rel=1e-12)
    if P.exact_cost(c, m, rows) < 1e6:
        assert r.after <= P.search_permutation(score, n, m, search="exact").after * (1 + 1e-12)


def test_local_search_reaches_the_optimum_on_a_planted_problem():
    # channels 0..7 are large in alternating rows; the identity puts pairs of large ones together
    score = torch.full((2, 16), 0.01, dtype=torch.float64)
    score[0, :4] = score[1, 4:8] = 1.0
    r = P.search_permutation(score, 2, 4, search="local")
    assert r.after == pytest.approx(_brute(score[:, :12], 2, 4) + 0.04, rel=1e-9) or r.after > r.before
    assert r.after == pytest.approx(P.search_permutation(score, 2, 4, search="exact").after)


@pytest.mark.parametrize("m, n", [(8, 4), (8, 2), (6, 3), (4, 2), (4, 1), (4, 3)])
def test_pair_kernels_equal_the_generic_split_evaluation(m, n):
    from nmsparse.permute import kernels
    from nmsparse.permute.search import _splits

    g = torch.Generator().manual_seed(m * 10 + n)
    st_ = (torch.rand(2 * m, 40, generator=g, dtype=torch.float64) ** 3).numpy()
    st_[:, :5] = 0.5  # ties
    groups = torch.randperm(2 * m, generator=g).view(2, m).numpy()
    a, b = _splits(m)
    gain, best = kernels._pair_best(st_, groups, 0, 1, n, a, b)
    cols = groups.reshape(-1).copy()
    gain_ref, best_ref = kernels._pair_best_splits(st_, cols, m, n, a, b)
    assert gain == pytest.approx(gain_ref, rel=1e-9, abs=1e-12)


def test_search_is_deterministic_and_canonical():
    score = torch.rand(30, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = P.search_permutation(score, 2, 4, seed=5)
    b = P.search_permutation(score, 2, 4, seed=5)
    assert torch.equal(a.perm, b.perm)
    groups = a.perm.view(-1, 4)
    assert torch.equal(groups, groups.sort(1).values) and torch.equal(groups[:, 0], groups[:, 0].sort().values)


def test_identity_when_nothing_to_gain():
    r = P.search_permutation(torch.ones(4, 8), 2, 4)
    assert torch.equal(r.perm, torch.arange(8)) and r.after == r.before


@pytest.mark.parametrize("bad, msg", [
    (dict(score=torch.ones(3)), "2-D float tensor"),
    (dict(score=torch.ones(3, 6)), "not a multiple of m=4"),
    (dict(score=-torch.ones(3, 8)), "non-negative"),
    (dict(score=torch.full((3, 8), float("nan"))), "finite"),
    (dict(search="best"), "search must be one of"),
    (dict(escapes=-1), "escapes must be"),
    (dict(restarts=0), "restarts must be"),
    (dict(score=torch.ones(3, 64), search="exact"), "too large"),
])
def test_search_errors(bad, msg):
    kw = dict(score=torch.ones(3, 8), n=2, m=4) | bad
    with pytest.raises(ValueError, match=msg):
        P.search_permutation(kw.pop("score"), kw.pop("n"), kw.pop("m"), **kw)


# -- models ------------------------------------------------------------------------------------------
def _randomize_bn(model):
    g = torch.Generator().manual_seed(7)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(torch.randn(mod.num_features, generator=g))
        if isinstance(mod, nn.LayerNorm):
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    return model


def _outliers(model):
    """Heavy-tailed weights, so that every space has something to gain."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.weight.mul_(torch.randn(mod.weight.shape, generator=g).pow(2))
    return model


class Residual(nn.Module):
    """Residual branches, a depthwise conv, BatchNorm, a tied per-channel parameter, LayerNorm over
    channels after a flatten/transpose, a mean over tokens; a concat and a grouped conv that block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b = nn.Conv2d(16, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.p = nn.Conv2d(16, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(32, 16, 1)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.b(F.gelu(self.dw(self.a(x)))) * self.scale
        x = self.bn(x)
        z = F.relu(self.p(x))
        x = x + self.c(torch.cat([z, self.grouped(z)], 1))
        t = x.flatten(2).transpose(1, 2)                      # (B, HW, C)
        t = t + self.fc2(F.relu(self.fc1(self.norm(t))))
        return self.head(t.mean(1))


class TinyEncoder(nn.Module):
    """A MiniLM-like encoder written with plain modules (BERT post-LN blocks, embeddings, GELU FFN)."""

    def __init__(self, vocab=50, dim=32, heads=4, ffn=64, depth=2, tokens=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(tokens, dim)
        self.ln0 = nn.LayerNorm(dim)
        self.heads = heads
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict(dict(q=nn.Linear(dim, dim), k=nn.Linear(dim, dim), v=nn.Linear(dim, dim),
                                                  o=nn.Linear(dim, dim), ln1=nn.LayerNorm(dim), up=nn.Linear(dim, ffn),
                                                  down=nn.Linear(ffn, dim), ln2=nn.LayerNorm(dim))))
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids):
        b, t = ids.shape
        x = self.ln0(self.tok(ids) + self.pos(torch.arange(t, device=ids.device)))
        for L in self.layers:
            def split(z):
                return z.view(b, t, self.heads, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(split(L["q"](x)), split(L["k"](x)), split(L["v"](x)))
            x = L["ln1"](x + L["o"](a.transpose(1, 2).reshape(b, t, -1)))
            x = L["ln2"](x + L["down"](F.gelu(L["up"](x))))
        return torch.tanh(self.pool(x.mean(1)))


def _check_preserved(model, x, n=2, m=4, **kw):
    model.eval()
    run = (lambda mod: mod(**x)) if isinstance(x, dict) else (lambda mod: mod(x))
    with torch.no_grad():
        before = run(model)
    state = copy.deepcopy(model.state_dict())
    rep = nmsparse.permute_channels(model, n, m, example_inputs=x, **kw)
    with torch.no_grad():
        after = run(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    changed = [k for k in state if not torch.equal(state[k], model.state_dict()[k])]
    return rep, changed


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_function_preserved_on_registry_models(name):
    torch.manual_seed(0)
    model = _outliers(_randomize_bn(build_model(name)))
    rep, changed = _check_preserved(model, torch.randn(4, 1, 28, 28))
    assert rep.traced and rep.permuted and changed
    before, after = rep.total()
    assert after > before
    for sp in rep.spaces:  # the objective of every space never goes down
        if sp.before is not None:
            assert sp.after >= sp.before
    rows = {e.param: e for e in rep.layers}
    if name == "resnet":
        assert rows["layers.1.0.shortcut.0.weight"].space == rows["layers.1.0.conv1.weight"].space  # tied
        assert rows["conv1.weight"].status == "unpermuted" and "model input" in rows["conv1.weight"].reason
    else:
        proj = rows["blocks.0.attn.proj.weight"]
        assert proj.status == "unpermuted" and "view" in proj.reason
        assert rows["blocks.0.attn.q.weight"].space == rows["blocks.3.fc1.weight"].space == rows["head.weight"].space
        assert "pos" in changed  # the position embedding follows the residual stream's permutation


def test_function_preserved_with_residual_branches_and_blocked_layers():
    torch.manual_seed(0)
    model = _outliers(_randomize_bn(Residual()))
    rep, changed = _check_preserved(model, torch.randn(2, 3, 8, 8), keep_dense=())
    rows = {e.param: e for e in rep.layers}
    for k in ("a", "b", "p", "fc1", "fc2", "head"):
        assert rows[f"{k}.weight"].status == "permuted", k
    assert rows["a.weight"].space == rows["p.weight"].space == rows["head.weight"].space  # the residual stream
    assert rows["a.weight"].space != rows["b.weight"].space  # the depthwise conv passes a's output space to b
    assert rows["dw.weight"].space == rows["b.weight"].space
    for k in ("dw.weight", "scale", "bn.running_mean", "norm.weight", "stem.bias", "c.bias"):
        assert k in changed, k
    assert rows["c.weight"].status == "unpermuted" and "cat" in rows["c.weight"].reason
    assert rows["grouped.weight"].status == "unpermuted" and "grouped" in rows["grouped.weight"].reason
    assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4


def test_function_preserved_on_a_minilm_like_encoder_with_wanda_scores():
    torch.manual_seed(0)
    model = _outliers(_randomize_bn(TinyEncoder()))
    ids = torch.randint(0, 50, (3, 16))
    rep, changed = _check_preserved(model, ids, calib=[ids[:2], (ids[2:], None)], method="wanda", keep_dense=())
    rows = {e.param: e for e in rep.layers}
    assert rows["layers.0.down.weight"].status == "permuted"
    assert "tok.weight" in changed and "ln0.weight" in changed  # embeddings and norms follow the stream
    assert rows["layers.0.o.weight"].status == "unpermuted"
    # the residual stream reaches the pooler only through a mean: permuted with it
    assert rows["layers.0.q.weight"].space == rows["pool.weight"].space


def test_untraceable_model_is_reported_and_untouched():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x

    model = Branchy()
    state = copy.deepcopy(model.state_dict())
    rep = nmsparse.permute_channels(model, 2, 4, example_inputs=torch.ones(2, 8), keep_dense=())
    assert not rep.traced and "cannot be traced" in rep.layers[0].reason
    assert "torch.fx" in rep.layers[0].reason and "torch.export" in rep.layers[0].reason  # both tried
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_mismatch_restores_the_model(monkeypatch):
    model = _outliers(build_model("mlp"))
    state = copy.deepcopy(model.state_dict())

    def producers_only(mod, space, perm):
        for name in space.producers:
            with torch.no_grad():
                w = dict(mod.named_modules())[name].weight
                w.copy_(w[perm])

    monkeypatch.setattr("nmsparse.permute.channels.apply_space", producers_only)
    with pytest.raises(RuntimeError, match="changed the model's output"):
        nmsparse.permute_channels(model, 2, 4, example_inputs=torch.randn(2, 1, 28, 28))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_training_mode_kept_and_sparsify_afterwards():
    model = _outliers(build_model("resnet")).train()
    x = torch.randn(2, 1, 28, 28)
    nmsparse.permute_channels(model, 2, 4, example_inputs=x)
    assert model.training
    report = nmsparse.sparsify(model, 2, 4, method="fixed")
    assert report.sparse


def test_flat_layout_with_3x3_kernels_blocks_the_space():
    model = build_model("resnet")
    rep = nmsparse.permute_channels(model, 2, 4, example_inputs=torch.randn(2, 1, 28, 28), layout="flat")
    rows = {e.param: e for e in rep.layers}
    assert "layout='flat'" in rows["layers.0.0.conv2.weight"].reason


@pytest.mark.parametrize("kw, msg", [
    (dict(method="sparsegpt"), "method must be one of"),
    (dict(search="fast"), "search must be one of"),
    (dict(escapes=1.5), "escapes must be"),
    (dict(example_inputs=None), "needs example_inputs"),
    (dict(method="wanda"), "needs calib"),
    (dict(method="wanda", calib=[]), "calib is empty"),
    (dict(n=4, m=4), "n"),
    (dict(include="nothing.*"), "matches no module"),
])
def test_permute_channels_errors(kw, msg):
    model = build_model("mlp")
    state = copy.deepcopy(model.state_dict())
    args = dict(n=2, m=4, example_inputs=torch.randn(2, 1, 28, 28)) | kw
    with pytest.raises(ValueError, match=msg):
        nmsparse.permute_channels(model, args.pop("n"), args.pop("m"), **args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_already_sparse_model_is_refused():
    model = build_model("mlp")
    nmsparse.sparsify(model, 2, 4)
    with pytest.raises(ValueError, match="already N:M sparse"):
        nmsparse.permute_channels(model, 2, 4, example_inputs=torch.randn(2, 1, 28, 28))


# -- prune and the CLI ---------------------------------------------------------------------------------
def test_prune_with_permute_keeps_more_and_preserves_nm():
    torch.manual_seed(0)
    base = _outliers(_randomize_bn(build_model("resnet"))).eval()
    x = torch.randn(8, 1, 28, 28)
    plain, perm = copy.deepcopy(base), copy.deepcopy(base)
    r0 = nmsparse.prune(plain, 2, 4, method="magnitude", calib=[x])
    r1 = nmsparse.prune(perm, 2, 4, method="magnitude", calib=[x], permute=True)
    assert getattr(r0, "permutation", None) is None and r1.permutation.permuted
    assert r1.mean("kept_abs") > r0.mean("kept_abs")
    assert "permutation" in r1.to_dict() and "permutation" not in r0.to_dict()
    for e in r1.sparse:
        assert nmsparse.layer_is_nm(dict(perm.named_modules())[e.name].weight, 2, 4)


@pytest.mark.parametrize("kw, msg", [
    (dict(transposable=True), "does not combine with transposable"),
    (dict(calib=None), "needs calib"),
    (dict(permute="yes"), "permute must be True or False"),
])
def test_prune_permute_errors(kw, msg):
    model = build_model("mlp")
    state = copy.deepcopy(model.state_dict())
    args = dict(method="magnitude", calib=[torch.randn(2, 1, 28, 28)], permute=True) | kw
    with pytest.raises(ValueError, match=msg):
        nmsparse.prune(model, 2, 4, **args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _outliers(build_model("mlp", image_size=8))
    path = tmp_path / "final.safetensors"
    from nmsparse.plumbing.checksum import sign

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=sign(tensors, {"config": json.dumps({"model": "mlp", "data": "digits"})}))
    return path


def test_cli_permute(tmp_path, capsys):
    from nmsparse.cli.dispatch import main

    ckpt = _checkpoint(tmp_path)
    rc = main(["prune", "--checkpoint", str(ckpt), "--nm", "2:4", "--method", "magnitude", "--permute",
               "--calib-samples", "20", "--test-subset", "100", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    rep = json.loads((tmp_path / "o" / "prune_report.json").read_text())["report"]
    perm = rep["permutation"]
    assert perm["kept_total_after"] > perm["kept_total_before"]
    assert "input channels" in capsys.readouterr().out
    rc = main(["prune", "--checkpoint", str(ckpt), "--method", "magnitude", "--permute", "--transposable",
               "--out", str(tmp_path / "t"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not combine with transposable" in err and len(err.strip().splitlines()) == 1


def test_tied_weights_block_their_channel_spaces():
    """An embedding tied to an LM head: the spaces that touch the tied weight stay unpermuted (with the
    reason), the others are permuted, and the function is unchanged."""

    class Tied(nn.Module):
        def __init__(self, vocab=50, d=16):
            super().__init__()
            self.emb, self.fc0 = nn.Embedding(vocab, d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            h = self.fc0(self.emb(x))
            return self.head(h + self.fc2(torch.relu(self.fc1(h))))

    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randint(0, 50, (2, 8))
    ref = model(x)
    report = nmsparse.permute_channels(model, 2, 4, example_inputs=x, keep_dense=())
    assert model.head.weight is model.emb.weight
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    text = report.table()
    assert "shares its weight with" in text and "fc2.weight" in text
