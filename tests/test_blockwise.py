"""Block-wise pruning of transformers models streamed from disk (nmsparse.pruning.blockwise), perplexity
(nmsparse.pruning.perplexity), and the memory they need. Tiny random LLaMA models built from configs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nmsparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from nmsparse.pruning.blockwise import OUTSIDE, prune_pretrained  # noqa: E402
from nmsparse.pruning.perplexity import perplexity, windows  # noqa: E402
from nmsparse.calibration.streaming import find_blocks  # noqa: E402


def tiny_llama(tie: bool = False, layers: int = 3, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib_batches(k: int = 3, b: int = 4, t: int = 16, vocab: int = 120):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(k)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(d)
    return model, d


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "adaprune"])
def test_blockwise_equals_whole_model_pruning(saved, tmp_path, method):
    model, d = saved
    whole = copy.deepcopy(model)
    ref = nmsparse.prune(whole, 2, 4, method=method, calib=calib_batches())
    rep = prune_pretrained(d, tmp_path / "out", 2, 4, method=method, calib=calib_batches())
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    sw, sb = whole.state_dict(), back.state_dict()
    assert sw.keys() == sb.keys()
    for k in sw:
        assert torch.equal(sw[k], sb[k]), k
    assert rep.results.keys() == ref.results.keys() and len(rep.results) == 20
    for k in ref.results:
        assert rep.results[k].kept_abs == pytest.approx(ref.results[k].kept_abs, abs=1e-12)
    dense = {e.param: e.reason for e in rep.dense}
    assert dense["lm_head.weight"] == "last weight layer (keep_dense)"
    assert dense["model.layers.0.self_attn.q_proj.weight"] == "first weight layer (keep_dense)"
    assert len(rep.settings["blocks"]) == 3 and rep.settings["peak_rss_bytes"] > 0


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_blockwise_equals_whole_model_with_dropout(tmp_path, method):
    """OPT has dropout 0.1: blocks must run in eval mode while they give the next block its inputs."""
    cfg = transformers.OPTConfig(vocab_size=120, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                 dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    whole = copy.deepcopy(model)
    nmsparse.prune(whole, 2, 4, method=method, calib=calib_batches())
    prune_pretrained(tmp_path / "src", tmp_path / "out", 2, 4, method=method, calib=calib_batches())
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "out")
    sb = back.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in whole.state_dict().items())


def test_mixed_block_kinds_are_refused(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=8,
                                   layer_types=["full_attention", "sliding_attention"])
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="mixes block kinds"):
        prune_pretrained(tmp_path / "src", tmp_path / "out", 2, 4, method="magnitude", calib=calib_batches())
    with pytest.raises(ValueError, match="mixes block kinds"):
        perplexity(tmp_path / "src", torch.arange(100) % 120, seqlen=16)
    assert not (tmp_path / "out").exists()


def test_head_outside_blocks_is_reported(saved, tmp_path):
    _, d = saved
    rep = prune_pretrained(d, tmp_path / "out", 2, 4, method="magnitude", calib=calib_batches(), keep_dense=())
    assert {e.param: e.reason for e in rep.dense}["lm_head.weight"] == OUTSIDE
    assert len(rep.results) == 21  # every block Linear, the first one included


def test_tokenizer_mappings_leave_padding_out(saved, tmp_path):
    model, d = saved
    calib = []
    for ids in calib_batches():
        am = torch.ones_like(ids)
        am[0, 10:] = 0
        calib.append({"input_ids": ids, "attention_mask": am})
    whole = copy.deepcopy(model)
    ref = nmsparse.prune(whole, 2, 4, method="sparsegpt", calib=calib)
    rep = prune_pretrained(d, tmp_path / "out", 2, 4, method="sparsegpt", calib=calib)
    assert {r.rows for r in rep.results.values()} == {3 * 4 * 16 - 3 * 6} == {r.rows for r in ref.results.values()}
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in whole.state_dict().items())


def test_tied_head_and_perplexity_streamed_equals_in_memory(tmp_path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 120, (200,), generator=torch.Generator().manual_seed(3))
    ref = perplexity(model, ids, seqlen=32, batch_size=2)
    got = perplexity(tmp_path / "src", ids, seqlen=32, batch_size=2)
    assert got["windows"] == 6 and got["tokens"] == 6 * 31
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    prune_pretrained(tmp_path / "src", tmp_path / "out", 2, 4, method="sparsegpt", calib=calib_batches())
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)
    pruned = perplexity(tmp_path / "out", ids, seqlen=32, batch_size=4)
    assert pruned["perplexity"] == pytest.approx(perplexity(back, ids, seqlen=32)["perplexity"], rel=1e-5)


def test_errors(saved, tmp_path):
    _, d = saved
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not an empty folder"):
        prune_pretrained(d, tmp_path / "busy", 2, 4, method="magnitude", calib=calib_batches())
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_pretrained(d, tmp_path / "o1", 2, 4, method="magnitude", calib=[])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match="has no model.safetensors"):
        prune_pretrained(tmp_path / "empty", tmp_path / "o2", 2, 4, method="magnitude", calib=calib_batches())
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="cannot read the weights"):
        prune_pretrained(tmp_path / "empty", tmp_path / "o3", 2, 4, method="magnitude", calib=calib_batches())
    with pytest.raises(ValueError, match="windows|fewer than one window"):
        windows(torch.arange(10), 32)
    with pytest.raises(ValueError, match="seqlen must be"):
        windows(torch.arange(10), 1)
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temporary folder left


def test_find_blocks_refuses_ambiguous_models():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
            self.b = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(ValueError, match="found 2 .* list of 2 identical blocks"):
        find_blocks(Two(), 2)
    with pytest.raises(ValueError, match="found no list of 3"):
        find_blocks(Two(), 3)


def test_stream_never_holds_the_whole_model(tmp_path):
    """Peak resident memory while pruning a ~150 MB model block by block, in a fresh process, grows by
    well under half the model's size (holding the model whole would take all of it)."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=1536, num_hidden_layers=16,
                                   num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "src")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    code = textwrap.dedent(f"""
        import json, resource, torch, transformers
        from nmsparse.pruning.blockwise import prune_pretrained
        calib = [torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rep = prune_pretrained({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, 2, 4, method="sparsegpt",
                               calib=calib)
        print(json.dumps({{"base": base, "peak": rep.settings["peak_rss_bytes"], "pruned": len(rep.results)}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["pruned"] == 16 * 7 - 1
    grown = got["peak"] - got["base"]
    assert size > 140e6
    assert grown < 0.4 * size, f"peak grew by {grown / 1e6:.0f} MB while the model is {size / 1e6:.0f} MB"


def test_blockwise_makes_one_pattern(saved, tmp_path, monkeypatch):
    """n, m are checked once for the whole run (issue 22), not once per block or layer."""
    from nmsparse.masking.pattern import NMPattern

    made = []
    original = NMPattern.__post_init__

    def counting(self):
        original(self)
        made.append((self.n, self.m))

    monkeypatch.setattr(NMPattern, "__post_init__", counting)
    _, d = saved
    report = prune_pretrained(d, tmp_path / "out", 2, 4, method="sparsegpt", calib=calib_batches(2))
    assert report.sparse and made == [(2, 4)]
