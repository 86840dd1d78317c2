"""N:M LoRA (peft): the adapted and the merged weights stay N:M, merging keeps the outputs, an adapter
saves and loads back onto the N:M base, and LoRA distillation of a tiny BERT ends 2:4 after a
save / reload round trip."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.masking.layout import layer_is_nm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from nmsparse import lora  # noqa: E402

TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"  # every encoder Linear, not the pooler


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def pruned_bert():
    dense = tiny_bert()
    model = copy.deepcopy(dense)
    nmsparse.prune(model, 2, 4, method="magnitude", include="encoder.*", keep_dense=(), progress=False)
    return model, dense


def batches(k=4, b=4, t=10):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        ids = torch.randint(5, 100, (b, t), generator=g)
        am = torch.ones(b, t, dtype=torch.long)
        am[0, t // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def config(**kw):
    return lora.nm_lora_config(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def randomize(model):
    """Non-zero LoRA B (peft starts it at zero, so B A = 0 would prove nothing)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def encoder_linears(model):
    return {k: v for k, v in model.named_modules() if isinstance(v, nn.Linear) and ".encoder." in f".{k}"}


def test_adapted_and_merged_weights_are_nm_and_merge_keeps_outputs():
    model, _ = pruned_bert()
    support = {k: v.weight != 0 for k, v in encoder_linears(model).items()}
    pm = lora.get_nm_peft_model(model, config())
    randomize(pm)
    layers = [m for m in pm.modules() if isinstance(m, lora.NMLoraLinear)]
    assert len(layers) == 12
    for layer in layers:  # the weight the forward uses, W + (s B A) * E, is 2:4
        w = layer.get_base_layer().weight + layer.get_delta_weight("default")
        assert layer_is_nm(w, 2, 4)
        dense_delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
        assert not layer_is_nm(layer.get_base_layer().weight + dense_delta, 2, 4)  # plain LoRA would not be
    x = batches(1)[0]
    with torch.no_grad():
        before = pm(**x).last_hidden_state
    merged = lora.merge(pm)
    with torch.no_grad():
        after = merged(**x).last_hidden_state
    assert torch.allclose(before, after, atol=1e-5)
    for k, v in encoder_linears(merged).items():
        assert layer_is_nm(v.weight, 2, 4), k
        assert not ((v.weight != 0) & ~support[k]).any(), k  # zeros stay where the pruned model had them
    assert not any(isinstance(m, lora.NMLoraLinear) for m in merged.modules())


def test_forward_equals_the_masked_weight_formula():
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.mul_(nmsparse.nm_mask(layer.weight, 2, 4))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer

        def forward(self, x):
            return self.fc(x)

    pm = lora.get_nm_peft_model(Wrap(), lora.nm_lora_config(r=2, lora_alpha=2, target_modules=["fc"]))
    randomize(pm)
    fc = pm.base_model.model.fc
    a, b = fc.lora_A["default"].weight, fc.lora_B["default"].weight
    w = layer.weight + (b @ a) * (layer.weight != 0)
    x = torch.randn(3, 8)
    assert torch.allclose(pm(x), x @ w.T + layer.bias, atol=1e-6)


def test_adapter_saves_and_loads_back_onto_the_nm_base(tmp_path):
    model, _ = pruned_bert()
    base = copy.deepcopy(model)
    pm = lora.get_nm_peft_model(model, config())
    randomize(pm)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = lora.load_nm_adapter(base, tmp_path / "adapter")
    assert sum(isinstance(m, lora.NMLoraLinear) for m in loaded.modules()) == 12
    x = batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(pm(**x).last_hidden_state, loaded(**x).last_hidden_state, atol=1e-6)


def test_lora_distillation_merged_saved_reloaded_still_2_4(tmp_path):
    student, teacher = pruned_bert()
    xs = batches()

    def gap(model):
        with torch.no_grad():
            return sum(float((model(**x).last_hidden_state - teacher(**x).last_hidden_state).pow(2).mean())
                       for x in xs)

    before = gap(student)
    pm = lora.get_nm_peft_model(student, config())
    report = nmsparse.distill(pm, teacher, xs, steps=30, lr=5e-3, progress=False, finalize_student=False)
    assert report.method == "lora" and report.masks_unchanged is True
    merged = lora.merge(pm)
    assert gap(merged.eval()) < before
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModel.from_pretrained(tmp_path / "merged", local_files_only=True)
    lin = encoder_linears(again)
    assert len(lin) == 12 and all(layer_is_nm(v.weight, 2, 4) for v in lin.values())


def test_errors():
    model, dense = pruned_bert()
    with pytest.raises(ValueError, match="LoRA target 'encoder.layer.0.attention.self.query' is not 2:4"):
        lora.get_nm_peft_model(dense, config())
    assert not any(isinstance(m, lora.NMLoraLinear) for m in dense.modules())  # untouched
    with pytest.raises(ValueError, match="match no module"):
        lora.get_nm_peft_model(model, lora.nm_lora_config(r=2, target_modules=["nothing"]))
    with pytest.raises(ValueError, match="plain peft LoraConfig"):
        lora.get_nm_peft_model(model, peft.LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.nm_lora_config(r=2, target_modules=TARGETS, use_dora=True)
    with pytest.raises(ValueError, match="rewrites the base weight"):
        lora.nm_lora_config(r=2, target_modules=TARGETS, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="no N:M LoRA layer"):
        lora.merge(model)
    with pytest.raises(ValueError, match="is a Embedding"):
        lora.get_nm_peft_model(model, lora.nm_lora_config(r=2, target_modules=["word_embeddings"]))
