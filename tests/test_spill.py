"""Calibration hidden states on disk (nmsparse.calibration.spill), pruning only the first blocks
(prune_pretrained(blocks=K)), and the memory block-wise pruning needs when the calibration hidden
states are larger than the model."""

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
from nmsparse.calibration.spill import HiddenSpill, SpilledItems

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from nmsparse.pruning.blockwise import prune_pretrained  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_spill_round_trip_and_advance(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, 5, 7, generator=g).to(dtype) for b in (3, 1, 4)]
    extra = torch.arange(5)
    with HiddenSpill(tmp_path) as spill:
        for x in xs:
            spill.append({"hidden_states": x, "position_ids": extra})
        assert len(spill) == 3 and len(list(tmp_path.iterdir())) == 1
        for i, x in enumerate(xs):
            kw = spill.load(i)
            assert kw["hidden_states"].dtype == dtype and torch.equal(kw["hidden_states"], x)
            assert kw["position_ids"] is extra
        # the results may have other shapes; the files swap and are rewritten every time
        spill.advance(lambda kw: kw["hidden_states"][:, :2] * 2)
        spill.advance(lambda kw: kw["hidden_states"].transpose(1, 2) + 1)
        for i, x in enumerate(spill.batches()):
            assert torch.equal(x["hidden_states"], (xs[i][:, :2] * 2).transpose(1, 2) + 1)
        items = SpilledItems(spill, lambda kw, j: (j, kw["hidden_states"].shape))
        assert list(items) == list(items) == [(0, (3, 7, 2)), (1, (1, 7, 2)), (2, (4, 7, 2))]
    assert list(tmp_path.iterdir()) == []  # closed: its folder is gone


def test_spill_refuses_a_non_tensor(tmp_path):
    with HiddenSpill(tmp_path) as spill, pytest.raises(TypeError, match="must be a tensor"):
        spill.append({"hidden_states": (torch.zeros(2),)})


def _llama(layers: int = 3):
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 120, (4, 16), generator=g) for _ in range(3)]


@pytest.mark.parametrize("method", ["sparsegpt", "adaprune"])
def test_first_blocks_only_equal_whole_model_pruning_of_them(tmp_path, method):
    model = _llama()
    model.save_pretrained(tmp_path / "src")
    whole = copy.deepcopy(model)
    first = [f"model.layers.{i}.*" for i in range(2)]
    nmsparse.prune(whole, 2, 4, method=method, calib=_calib(), include=first, keep_dense=())
    rep = prune_pretrained(tmp_path / "src", tmp_path / "out", 2, 4, method=method, calib=_calib(), blocks=2,
                           keep_dense=())
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    sb = back.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in whole.state_dict().items())
    assert torch.equal(sb["model.layers.2.mlp.up_proj.weight"], model.state_dict()["model.layers.2.mlp.up_proj.weight"])
    assert len(rep.results) == 14 and rep.settings["pruned_blocks"] == 2
    reasons = {e.param: e.reason for e in rep.dense}
    assert reasons["model.layers.2.mlp.down_proj.weight"] == "after the first 2 blocks (blocks=2): copied unchanged"
    assert [b["layers"] for b in rep.settings["blocks"]] == [7, 7, 0]
    assert all(b["cpu_s"] >= 0 and b["rss_bytes"] > 0 for b in rep.settings["blocks"])
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="blocks must be an integer from 1 to the model's 3 blocks"):
            prune_pretrained(tmp_path / "src", tmp_path / "o2", 2, 4, method=method, calib=_calib(), blocks=bad)
    assert not (tmp_path / "o2").exists()


def test_peak_memory_does_not_hold_the_calibration_hidden_states(tmp_path):
    """A fresh process prunes a tiny model with 52 MB of calibration hidden states per block boundary
    (100 batches of 64 windows of 64 tokens, 32 features): its peak resident memory grows by well under
    half of that (holding them in memory would take all of it, and more while a block runs). The base is
    taken after a first small run, so that imports and lazy initialisations are not counted."""
    model = _llama(layers=2)
    model.save_pretrained(tmp_path / "src")
    batches, windows, seq, hidden = 100, 64, 64, 32
    total = batches * windows * seq * hidden * 4
    code = textwrap.dedent(f"""
        import json, resource, torch
        from nmsparse.pruning.blockwise import prune_pretrained
        g = torch.Generator().manual_seed(0)
        calib = [torch.randint(0, 120, ({windows}, {seq}), generator=g) for _ in range({batches})]
        src = {str(tmp_path / 'src')!r}
        prune_pretrained(src, {str(tmp_path / 'warm')!r}, 2, 4, method="sparsegpt", calib=calib[:2])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rep = prune_pretrained(src, {str(tmp_path / 'out')!r}, 2, 4, method="sparsegpt", calib=calib, keep_dense=())
        print(json.dumps({{"base": base, "peak": rep.settings["peak_rss_bytes"], "pruned": len(rep.results)}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["pruned"] == 14 and total > 50e6
    grown = got["peak"] - got["base"]
    assert grown < 0.4 * total, f"peak grew by {grown / 1e6:.0f} MB; the hidden states are {total / 1e6:.0f} MB"
