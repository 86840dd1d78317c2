"""Hugging Face round trip of finalized N:M models: ``save_pretrained`` then ``from_pretrained`` gives back
the same dense weights with their zeros, bit for bit (signed zeros included), the same outputs, and N:M
still holds. Tiny random BERT and GPT-2 built from configs (nothing downloaded); GPT-2's head is tied to
its token embedding and must stay tied and unpruned."""

from __future__ import annotations

import os

import pytest
import torch

import nmsparse
from nmsparse.masking.layout import layer_is_nm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that -0.0 and +0.0 (and NaN payloads) compare as different."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), k


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert_inputs():
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": am}


def encoder_linears(model) -> dict:
    return {k: v for k, v in model.named_modules() if isinstance(v, torch.nn.Linear) and k.startswith("encoder.")}


@pytest.mark.parametrize("how", ["prune", "sparsify"])
def test_bert_save_pretrained_round_trip(tmp_path, how):
    model = tiny_bert()
    if how == "prune":
        n, m = 2, 4
        nmsparse.prune(model, n, m, method="magnitude", include="encoder.*", keep_dense=())
    else:
        n, m = 4, 8
        nmsparse.sparsify(model, n, m, include="encoder.*", keep_dense=())
        model.train()(**bert_inputs())  # one training-mode pass: masks refreshed as in training
        nmsparse.finalize(model).eval()
    lin = encoder_linears(model)
    assert len(lin) == 12 and all(layer_is_nm(v.weight, n, m) for v in lin.values())
    negzero = sum(int(((v.weight == 0) & torch.signbit(v.weight)).sum()) for v in lin.values())
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path)
    back, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    back.eval()
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert_same_state(model, back)
    assert all(layer_is_nm(v.weight, n, m) for v in encoder_linears(back).values())
    assert negzero > 0  # -0.0 at pruned positions of negative weights survives the file as it is
    assert negzero == sum(int(((v.weight == 0) & torch.signbit(v.weight)).sum())
                          for v in encoder_linears(back).values())
    with torch.no_grad():
        a, b = model(**bert_inputs()), back(**bert_inputs())
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


def test_bert_fp16_round_trip_keeps_dtype_and_pattern(tmp_path):
    model = tiny_bert()
    nmsparse.prune(model, 2, 4, method="magnitude", include="encoder.*", keep_dense=())
    model.half().save_pretrained(tmp_path)
    back = transformers.BertModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert back.dtype == torch.float16
    assert_same_state(model, back)
    assert all(layer_is_nm(v.weight, 2, 4) for v in encoder_linears(back).values())


def test_gpt2_tied_head_survives_round_trip(tmp_path):
    """GPT-2's blocks are transformers' Conv1D (weight ``(in, out)``, groups along dim 0); the head
    ``lm_head`` is tied to ``transformer.wte``: it stays dense and still tied after loading."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    r = nmsparse.prune(model, 2, 4, method="magnitude", keep_dense=())
    assert "shared with `transformer.wte`" in {e.param: e.reason for e in r.dense}["lm_head.weight"]
    conv1d = {k: v for k, v in model.named_modules() if type(v).__name__ == "Conv1D"}
    assert len(conv1d) == 8 and {e.name for e in r.sparse} == set(conv1d)
    emb = model.transformer.wte.weight.detach().clone()
    model.save_pretrained(tmp_path)
    back, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    back.eval()
    assert not any(info.values()), info
    assert back.lm_head.weight is back.transformer.wte.weight  # tied again, not a second copy
    assert torch.equal(back.lm_head.weight, emb)  # and not pruned
    assert_same_state(model, back)
    for k, v in back.named_modules():
        if k in conv1d:
            assert nmsparse.is_nm(v.weight, 2, 4, dim=0), k
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_saving_before_finalize_loses_the_weights(tmp_path):
    """The pitfall docs/export.md warns about: a model still carrying its N:M parametrizations saves
    ``...parametrizations.weight.original`` / ``.mask`` keys that a fresh model does not have, so
    ``from_pretrained`` re-initializes those weights at random (it only prints a load report)."""
    model = tiny_bert()
    nmsparse.sparsify(model, 2, 4, include="encoder.*", keep_dense=())
    model.save_pretrained(tmp_path)
    _, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert len(info["missing_keys"]) == 12
    assert all(k.endswith(".weight") for k in info["missing_keys"])
    assert any(".parametrizations.weight.original" in k for k in info["unexpected_keys"])
