"""nmsparse.integrations.hf: sparsified transformers models through save_pretrained / from_pretrained and
transformers.Trainer (training, checkpoints, resume), on a tiny random BERT built from a config (offline)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import nmsparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from nmsparse.integrations import hf  # noqa: E402


def tiny_config(**kw):
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32, num_labels=3, **kw)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(tiny_config())


def dataset(k: int = 32, t: int = 8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (k, t), generator=g)
    labels = (ids[:, 0] % 3).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(t, dtype=torch.long), "labels": labels[i]}
            for i in range(k)]


def batch():
    return torch.randint(5, 100, (3, 8), generator=torch.Generator().manual_seed(2))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = tiny_model()
    report = hf.sparsify(model, 2, 4, include="bert.encoder.*", keep_dense=())
    assert len(report.sparse) == 12 and model.config.nmsparse["layers"][0] == "bert.encoder.layer.0.attention.self.query"
    model.train()
    model(batch()).logits.sum().backward()  # one training-mode pass: mask step counters move
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["nmsparse"]["n"] == 2
    for cls in (transformers.BertForSequenceClassification, transformers.AutoModelForSequenceClassification):
        back = hf.from_pretrained(cls, tmp_path)
        assert not back.training
        ref, got = state(model), state(back)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
        assert nmsparse.masks(back).keys() == nmsparse.masks(model).keys()
        model.eval()
        assert torch.equal(model(batch()).logits, back(batch()).logits)


def test_transposable_settings_round_trip(tmp_path):
    model = tiny_model()
    hf.sparsify(model, 2, 4, include="bert.encoder.*", keep_dense=(), transposable=True, mask_method="optimal",
                update_every=40, method="ste")
    model.save_pretrained(tmp_path)
    back = hf.from_pretrained(transformers.BertForSequenceClassification, tmp_path)
    p = next(p for _, _, p in nmsparse.sparse_layers(back))
    assert (p.transposable, p.update_every, p.method, p.mask_fn.keywords["method"]) == (True, 40, "ste", "optimal")


def test_errors(tmp_path):
    plain = tiny_model()
    plain.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="records no nmsparse settings"):
        hf.from_pretrained(transformers.BertForSequenceClassification, tmp_path / "dense")
    with pytest.raises(ValueError, match="has no config.json"):
        hf.from_pretrained(transformers.BertForSequenceClassification, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no N:M sparse layer"):
        hf.record(plain)
    with pytest.raises(ValueError, match="no transformers config"):
        hf.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), keep_dense=())
    with pytest.raises(ValueError, match="custom mask_fn"):
        hf.sparsify(tiny_model(), 2, 4, mask_fn=lambda w: w != 0)
    # settings recorded for other layers than the weights hold
    model = tiny_model()
    hf.sparsify(model, 2, 4, include="bert.encoder.*", keep_dense=())
    model.save_pretrained(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["nmsparse"]["layers"] = cfg["nmsparse"]["layers"][:3]
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match BertForSequenceClassification sparsified as recorded"):
        hf.from_pretrained(transformers.BertForSequenceClassification, tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the weights"):
        hf.from_pretrained(transformers.BertForSequenceClassification, tmp_path / "s")
    # mixed settings cannot be recorded as one
    mixed = tiny_model()
    nmsparse.sparsify(mixed, 2, 4, include="bert.encoder.*", keep_dense=())
    list(nmsparse.sparse_layers(mixed))[-1][2].method = "ste"
    with pytest.raises(ValueError, match="other settings than the first sparse layer"):
        hf.record(mixed)


def _trainer(model, out, max_steps, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[hf.NMSparseCallback()])


def test_trainer_train_resume_finalize_reload(tmp_path):
    """SR-STE 2:4 with Trainer: 4 steps straight == 2 steps, checkpoint, resume for 2 more; the masks
    move during training; the checkpoint loads with hf.from_pretrained; finalize, save, reload: equal."""
    straight = tiny_model()
    nmsparse.sparsify(straight, 2, 4, include="bert.encoder.*", keep_dense=())  # recorded by the callback
    before = nmsparse.masks(straight)
    _trainer(straight, tmp_path / "a", 4).train()
    after = nmsparse.masks(straight)
    assert any(not torch.equal(before[k], after[k]) for k in before), "masks never changed during training"
    assert all(nmsparse.is_nm(v, 2, 4) for v in after.values())

    resumed = tiny_model()
    nmsparse.sparsify(resumed, 2, 4, include="bert.encoder.*", keep_dense=())
    _trainer(resumed, tmp_path / "b", 4).train()  # writes checkpoint-2 and checkpoint-4
    fresh = tiny_model(seed=123)  # other initial weights: everything must come from the checkpoint
    nmsparse.sparsify(fresh, 2, 4, include="bert.encoder.*", keep_dense=())
    _trainer(fresh, tmp_path / "b", 4).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    ref, got = state(straight), state(fresh)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)

    loaded = hf.from_pretrained(transformers.BertForSequenceClassification, tmp_path / "a" / "checkpoint-4")
    straight.eval()
    torch.testing.assert_close(loaded(batch()).logits, straight(batch()).logits, rtol=0, atol=0)

    final = nmsparse.finalize(copy.deepcopy(straight))
    final.save_pretrained(tmp_path / "final")
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "final")
    assert torch.equal(plain(batch()).logits, straight(batch()).logits)
    for name, mod in plain.named_modules():
        if name.startswith("bert.encoder.") and isinstance(mod, torch.nn.Linear):
            assert nmsparse.layer_is_nm(mod.weight, 2, 4), name


def test_gpt2_tied_head_and_conv1d_round_trip(tmp_path):
    """GPT-2: Conv1D blocks and, with shared='sparsify', the tied head/embedding N:M everywhere; the
    recorded settings rebuild exactly that."""
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    report = hf.sparsify(model, 2, 4, keep_dense=(), shared="sparsify")
    assert model.config.nmsparse["shared"] == "sparsify" and "lm_head" in model.config.nmsparse["layers"]
    assert any(e.name.endswith("c_attn") for e in report.sparse)
    model.save_pretrained(tmp_path)
    back = hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    assert nmsparse.masks(back).keys() == nmsparse.masks(model).keys()
    assert all(torch.equal(nmsparse.masks(back)[k], v) for k, v in nmsparse.masks(model).items())
    model.eval()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids).logits, back(ids).logits)
