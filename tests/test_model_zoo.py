"""The whole user path on the models users bring (issue 12), tiny random configurations built offline:
``sparsify`` -> a few training steps -> ``state_dict`` round trip into a freshly sparsified copy ->
``finalize`` -> strict load into the original class -> equal outputs; and ``prune`` (magnitude,
SparseGPT) -> valid N:M on every layer reported sparse. Each case pins which tensors stay dense and why."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.masking.layout import target_is_nm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

N, M = 2, 4
PARAMETRIZED = "weight already has another parametrization"


def _hf():
    return pytest.importorskip("transformers")


def _ids(vocab: int, b: int = 2, t: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# Each builder returns (model, a list of input batches, {tensor name prefix/exact: expected dense-reason start}).
def bert():
    t = _hf()
    cfg = t.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16)
    batches = [{"input_ids": _ids(64, seed=s), "attention_mask": torch.ones(2, 6, dtype=torch.long)} for s in range(2)]
    return t.BertModel(cfg), batches, {"embeddings.word_embeddings.weight": "Embedding is not supported"}


def gpt2():
    t = _hf()
    cfg = t.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    batches = [{"input_ids": _ids(64, seed=s)} for s in range(2)]
    return t.GPT2LMHeadModel(cfg), batches, {"lm_head.weight": "shared with `transformer.wte`"}


def _llama(tied: bool):
    t = _hf()
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    batches = [{"input_ids": _ids(64, seed=s)} for s in range(2)]
    expect = {"lm_head.weight": "shared with `model.embed_tokens`"} if tied else {}
    return t.LlamaForCausalLM(cfg), batches, expect


def llama_tied():
    return _llama(True)


def llama_untied():
    return _llama(False)


def vit():
    t = _hf()
    cfg = t.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32)
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(2, 3, 8, 8, generator=g)} for _ in range(2)]
    return t.ViTModel(cfg, add_pooling_layer=False), batches, {
        "embeddings.patch_embeddings.projection.weight": "channels reduction axis size 3 is not a multiple of m=4"}


def t5():
    t = _hf()
    cfg = t.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    batches = [{"input_ids": _ids(64, seed=s), "decoder_input_ids": _ids(64, t=4, seed=s + 9)} for s in range(2)]
    return t.T5ForConditionalGeneration(cfg), batches, {
        "lm_head.weight": "shared with `shared`", "shared.weight": "Embedding is not supported"}


def torch_encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    g = torch.Generator().manual_seed(0)
    return model, [torch.randn(2, 5, 16, generator=g) for _ in range(2)], {}


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        for conv in (self.stem, self.grouped, self.depthwise, self.pointwise):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def cnn():
    g = torch.Generator().manual_seed(0)
    return CNN(), [torch.randn(2, 4, 6, 6, generator=g) for _ in range(2)], {
        "depthwise.weight": "channels reduction axis size 1 is not a multiple of m=4"}


def _conv_net(conv: type, shape: tuple[int, ...]):
    model = nn.Sequential(conv(4, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3), nn.ReLU(),
                          nn.Flatten(2), _Mean(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    return model, [torch.randn(2, 4, *shape, generator=g) for _ in range(2)], {}


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(-1)


def conv1d():
    return _conv_net(nn.Conv1d, (9,))


def conv3d():
    return _conv_net(nn.Conv3d, (4, 4, 4))


class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.block(x))  # the same module twice
        return self.out(x)


def reuse():
    g = torch.Generator().manual_seed(0)
    return Reuse(), [torch.randn(4, 8, generator=g) for _ in range(2)], {}


def weight_norm():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
                          nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    return model, [torch.randn(4, 8, generator=g) for _ in range(2)], {"2.weight": PARAMETRIZED}


CASES: dict[str, Callable[[], tuple[nn.Module, list, dict]]] = {
    f.__name__: f for f in (bert, gpt2, llama_tied, llama_untied, vit, t5, torch_encoder, cnn, conv1d, conv3d,
                            reuse, weight_norm)
}
# tensors each case makes N:M (by full name ending), pinned so that a silent regression shows
SPARSE_COUNT = {"bert": 7, "gpt2": 4, "llama_tied": 7, "llama_untied": 8, "vit": 6, "t5": 16, "torch_encoder": 8,
                "cnn": 4, "conv1d": 3, "conv3d": 3, "reuse": 3, "weight_norm": 2}


def build(case: str, seed: int = 0):
    torch.manual_seed(seed)
    model, batches, expect = CASES[case]()
    return model, batches, expect


def call(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, tuple) else out


def check_nm(model: nn.Module, report) -> None:
    mods = dict(model.named_modules())
    for e in report.sparse:
        mod = mods[e.name]
        assert target_is_nm(getattr(mod, e.tensor_name), mod, e.tensor_name, N, M), e.param


def check_expected_dense(report, expect: dict) -> None:
    reasons = {e.param: e.reason for e in report.dense}
    for name, start in expect.items():
        assert reasons[name].startswith(start), (name, reasons.get(name))


@pytest.mark.parametrize("case", list(CASES))
def test_sparsify_train_round_trip_finalize(case):
    round_trip(case, "dense")


@pytest.mark.parametrize("case", ["gpt2", "t5"])
def test_shared_sparsify_round_trip(case):
    """With shared="sparsify" the tied head is N:M and every embedding using it sees the same weight."""
    plain = round_trip(case, "sparsify")
    head = plain.lm_head.weight
    assert nmsparse.layer_is_nm(head, N, M)
    assert head is plain.get_input_embeddings().weight


def round_trip(case: str, shared: str) -> nn.Module:
    ref, batches, expect = build(case)
    model = copy.deepcopy(ref)
    rep = nmsparse.sparsify(model, N, M, keep_dense=(), shared=shared)
    if shared == "dense":
        check_expected_dense(rep, expect)
        assert len(rep.sparse) == SPARSE_COUNT[case], [e.param for e in rep.sparse]
    else:
        assert len(rep.sparse) == SPARSE_COUNT[case] + 1 and "lm_head.weight" in nmsparse.masks(model)
    assert set(nmsparse.masks(model)) == {e.param for e in rep.sparse}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in batches:
        opt.zero_grad()
        call(model, batch).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = call(model, batches[0])
    # state_dict round trip into a freshly sparsified copy of the original
    copy2 = copy.deepcopy(ref)
    nmsparse.sparsify(copy2, N, M, keep_dense=(), shared=shared)
    copy2.load_state_dict(model.state_dict(), strict=True)
    copy2.eval()
    with torch.no_grad():
        assert torch.allclose(call(copy2, batches[0]), out, atol=1e-5)
    nmsparse.finalize(copy2)
    plain, _, _ = build(case, seed=1)  # the original class, other random weights
    plain.load_state_dict(copy2.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(call(plain, batches[0]), out, atol=1e-5)
    check_nm(plain, rep)
    return plain


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("case", list(CASES))
def test_prune_gives_valid_nm(case, method):
    model, batches, expect = build(case)
    rep = nmsparse.prune(model, N, M, method=method, calib=batches, keep_dense=())
    check_expected_dense(rep, expect)
    assert len(rep.sparse) == SPARSE_COUNT[case]
    check_nm(model, rep)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(call(model, batches[0])).all()
