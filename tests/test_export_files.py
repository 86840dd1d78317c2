"""save_compressed / load_compressed: exact round trips (ResNet, Linear, Conv1D, Hugging Face models),
an independent reader written from docs/format.md with json + struct + numpy only, and every error:
mismatched models, lying headers, truncated and corrupted files (the model must stay unchanged)."""

from __future__ import annotations

import copy
import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import nmsparse
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing import checksum
from nmsparse.export import FormatError, detect_nm, group_axis, load_compressed, read_header, save_compressed
from nmsparse.training.models import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resnet(n=2, m=4, layout="channels", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model("resnet")
    nmsparse.sparsify(model, n, m, layout=layout)
    nmsparse.finalize(model)
    with torch.no_grad():  # non-trivial batch-norm buffers, NaN and -0.0 inside kept weights
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.num_batches_tracked.fill_(7)
        w = model.layers[0][0].conv1.weight
        w[w != 0] = torch.where(torch.rand_like(w[w != 0]) < 0.05, float("nan"), w[w != 0])
    return model.to(dtype)


def fresh(dtype=torch.float32):
    torch.manual_seed(123)
    return build_model("resnet").to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_same_state(a: nn.Module, b: nn.Module, exact_zeros=False) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.is_floating_point():
            nz = x != 0
            assert torch.equal(bits(x)[nz], bits(y)[nz]) and bool((y[~nz] == 0).all()), k
        else:
            assert torch.equal(x, y), k


@pytest.mark.parametrize("n,m,layout,dtype", [(2, 4, "channels", torch.float32), (2, 4, "channels", torch.float16),
                                              (2, 4, "channels", torch.bfloat16), (4, 8, "flat", torch.float16),
                                              (1, 4, "channels", torch.float32)])
def test_resnet_round_trip(tmp_path, n, m, layout, dtype):
    model = resnet(n, m, layout, dtype=dtype)
    path = tmp_path / "m.safetensors"
    report = save_compressed(model, path, n, m, layout)
    assert len(report.compressed) == 8 and [e.name for e in report.dense_layers] == ["conv1.weight", "fc.weight"]
    assert f"reduction axis size {9 if layout == 'flat' else 1} is not a multiple of m={m}" == report.dense_layers[0].reason
    assert f"not {n}:{m} (first bad group w[0, 0:{m}])" == report.dense_layers[1].reason
    assert report.file_bytes == path.stat().st_size
    target = fresh(dtype)
    assert load_compressed(path, target) is target
    assert_same_state(model, target)
    x = torch.randn(2, 1, 28, 28).to(dtype)
    model.eval(), target.eval()
    torch.testing.assert_close(model(x), target(x), equal_nan=True, rtol=0, atol=0)
    header = read_header(path)
    assert (header["n"], header["m"], header["layout"], header["version"]) == (n, m, layout, 1)
    assert {e["name"] for e in header["dense_layers"]} == {"conv1.weight", "fc.weight"}


def test_sizes_add_up(tmp_path):
    model = resnet().half()
    r = save_compressed(model, tmp_path / "a.safetensors", 2, 4)
    for e in r.compressed:
        numel = math.prod(e.shape)
        assert e.stored_bytes == numel // 2 * 2 + numel // 4 * 2 * 2 // 8
    t = r.totals()
    assert t["sparse_layers_stored_bytes"] / t["sparse_layers_dense_bytes"] == pytest.approx(0.5625)
    assert 0 < r.file_bytes - t["stored_bytes"] < 16 * 1024  # the rest is the JSON header
    assert "8 N:M layers" in r.table() and "56.2%" in r.table()


def test_detect_nm(tmp_path):
    assert detect_nm(resnet(2, 4)) == (2, 4)
    assert detect_nm(resnet(4, 8)) == (4, 8)
    assert detect_nm(resnet(1, 4)) == (1, 4)
    assert detect_nm(fresh()) == (2, 4)  # nothing is N:M: the default
    r = save_compressed(resnet(4, 8), tmp_path / "a.safetensors")
    assert (r.n, r.m, len(r.compressed)) == (4, 8, 8)
    r = save_compressed(fresh(), tmp_path / "b.safetensors")
    assert not r.compressed and len(r.dense_layers) == 10


def test_group_axis():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    assert group_axis(nn.Linear(8, 3)) == ((3, 8), 1)
    assert group_axis(nn.Conv2d(8, 4, 3)) == ((4, 8, 3, 3), 1)
    assert group_axis(nn.Conv2d(8, 4, 3), "flat") == ((4, 72), 1)
    assert group_axis(nn.Conv1d(8, 4, 5, groups=2), "flat") == ((4, 20), 1)
    assert group_axis(Conv1D(6, 8)) == ((8, 6), 0)  # weight (in, out): groups along dim 0
    assert group_axis(nn.LayerNorm(8)) is None and group_axis(nn.Embedding(4, 8)) is None
    with pytest.raises(ValueError, match="layout must be one of"):
        group_axis(nn.Linear(8, 3), "rows")


class WithConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c = Conv1D(12, 16)  # in 16, out 12
        self.lin = nn.Linear(16, 8)


def test_conv1d_round_trip(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = WithConv1D()
    with torch.no_grad():
        model.c.weight.mul_(nmsparse.nm_mask(model.c.weight, 2, 4, dim=0))
        model.lin.weight.mul_(nmsparse.nm_mask(model.lin.weight, 2, 4, dim=1))
    r = save_compressed(model, tmp_path / "c.safetensors", 2, 4)
    assert sorted(e.name for e in r.compressed) == ["c.weight", "lin.weight"]
    assert read_header(tmp_path / "c.safetensors")["compressed"][0] == {
        "name": "c.weight", "shape": [16, 12], "dtype": "float32", "view": [16, 12], "dim": 0}
    target = WithConv1D()
    load_compressed(tmp_path / "c.safetensors", target)
    assert_same_state(model, target)


# ---- an independent reader, written from docs/format.md: json + struct + numpy, none of our code ----

NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "U8": np.uint8, "I64": np.int64, "BF16": np.uint16}


def spec_reader(path) -> dict[str, np.ndarray]:
    raw = open(path, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    meta = header.pop("__metadata__")
    assert meta["format"] == "nmsparse-nm" and meta["format_version"] == "1"
    n, m = int(meta["n"]), int(meta["m"])
    data = raw[8 + hlen:]
    arrays = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        arrays[name] = np.frombuffer(data[a:b], dtype=NP[info["dtype"]]).reshape(info["shape"])
    out = {}
    bits_per = (m - 1).bit_length()
    for e in json.loads(meta["compressed"]):
        values = arrays.pop(e["name"] + "::nm_values")
        index = arrays.pop(e["name"] + "::nm_index")
        view, dim = e["view"], e["dim"]
        moved = [s for i, s in enumerate(view) if i != dim] + [view[dim]]
        stream = int.from_bytes(index.tobytes(), "little")
        dense = np.zeros((math.prod(moved) // m, m), dtype=values.dtype)
        flat = values.reshape(-1, n)
        for g in range(dense.shape[0]):
            for j in range(n):
                p = (stream >> ((g * n + j) * bits_per)) & ((1 << bits_per) - 1)
                dense[g, p] = flat[g, j]
        out[e["name"]] = np.moveaxis(dense.reshape(moved), -1, dim).reshape(e["shape"])
    out.update(arrays)
    return out


@pytest.mark.parametrize("layout,dtype", [("channels", torch.float16), ("flat", torch.bfloat16),
                                          ("channels", torch.float32)])
def test_independent_reader(tmp_path, layout, dtype):
    model = resnet(2, 4, layout, dtype=dtype)
    save_compressed(model, tmp_path / "m.safetensors", 2, 4, layout)
    got = spec_reader(tmp_path / "m.safetensors")
    state = model.state_dict()
    assert got.keys() == state.keys()
    for k, t in state.items():
        ref = bits(t).numpy() if t.is_floating_point() else t.numpy()
        g = got[k].view(ref.dtype) if t.is_floating_point() else got[k]
        nz = (t != 0).numpy()
        assert np.array_equal(g[nz], ref[nz]) and not np.any(got[k].astype(np.float32)[~nz] if t.dtype != torch.bfloat16
                                                              else (g[~nz] & 0x7FFF)), k


# ---- errors on save ----

def test_save_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, 2, 4)
    with pytest.raises(ValueError, match="still has N:M parametrizations; call nmsparse.finalize"):
        save_compressed(model, path)
    with pytest.raises(ValueError, match="give both n and m"):
        save_compressed(resnet(), path, n=2)
    with pytest.raises(ValueError, match="need 0 < n < m"):
        save_compressed(resnet(), path, 4, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        save_compressed(resnet(), path, 2, 4, "rows")
    with pytest.raises(ValueError, match="needs an nn.Module"):
        save_compressed({}, path)
    bad = nn.Module()
    bad.register_buffer("a::b", torch.zeros(1))
    with pytest.raises(ValueError, match="reserves"):
        save_compressed(bad, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


# ---- errors on load: the model must stay unchanged ----

@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(resnet(), path, 2, 4)
    return path


def rewrite(src, dst, meta=None, tensors=None, drop=()):
    """A copy of ``src`` with changed metadata/tensors and a *valid* checksum of the changes (a lying
    writer): the structural checks behind the checksum must still catch it."""
    with safe_open(str(src), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        md = dict(f.metadata())
    md.update(meta or {})
    t.update(tensors or {})
    save_file(t, str(dst), metadata=checksum.sign(t, {k: v for k, v in md.items() if v is not None}))
    return dst


def expect_error(path, msg, model=None):
    model = model or fresh()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FormatError, match=msg) as e:
        load_compressed(path, model)
    assert isinstance(e.value, LoadError) and e.value.path == str(path)  # one `except LoadError` for every bad file
    for k, v in model.state_dict().items():
        assert torch.equal(bits(v) if v.is_floating_point() else v, bits(before[k]) if v.is_floating_point()
                           else before[k]), k


def _entries(path):
    return read_header(path)["compressed"]


LAST = "layers.2.0.shortcut.0.weight"


@pytest.mark.parametrize("case,msg", [
    (dict(meta={"n": "4"}), "need 0 < n < m"),
    (dict(meta={"n": "two"}), "bad metadata"),
    (dict(meta={"format": None}), "not an nmsparse compressed file"),
    (dict(meta={"format_version": "2"}), "format version 2; this nmsparse reads version 1"),
    (dict(meta={"layout": "rows"}), "bad metadata.*layout"),
    (dict(meta={"compressed": "[{"}), "bad metadata: JSONDecodeError"),
    (dict(meta={"compressed": "{}"}), "must be a JSON list"),
    (dict(meta={"n": "1"}), r"layers.0.0.conv1.weight::nm_values' is torch.float32 \(16, 3, 3, 8\), expected "
                            r"torch.float32 \(16, 3, 3, 4\)"),
    (dict(meta={"m": "8", "n": "4"}), "index has 288 bytes, expected 432"),
    (dict(drop=(LAST + "::nm_index",)), f"{LAST}::nm_index' of the model is missing"),
    (dict(drop=("bn1.bias",)), "'bn1.bias' of the model is missing"),
    (dict(tensors={"extra": torch.zeros(2)}), "holds tensor 'extra', which is not in the model"),
    (dict(tensors={LAST + "::nm_index": torch.zeros(256, dtype=torch.int8)}), "index must be a 1-D torch.uint8"),
    (dict(tensors={LAST + "::nm_index": torch.zeros(255, dtype=torch.uint8)}), "index has 255 bytes, expected 256"),
    (dict(tensors={LAST + "::nm_index": torch.full((256,), 0b11_11_11_11, dtype=torch.uint8)}),
     rf"{LAST}': corrupt index: group 0 \(w\[0, 0:4, 0, 0\]\) stores positions \[3, 3\]"),
    (dict(tensors={LAST + "::nm_values": torch.zeros(64, 1, 1, 16, dtype=torch.float16)}), "float16"),
    (dict(tensors={"bn1.bias": torch.zeros(16, dtype=torch.float64)}),
     "'bn1.bias' has dtype torch.float64 in the file but torch.float32 in the model"),
    (dict(tensors={"bn1.bias": torch.zeros(17)}), r"'bn1.bias' has shape \(17,\) in the file but \(16,\)"),
])
def test_lying_files(saved, tmp_path, case, msg):
    expect_error(rewrite(saved, tmp_path / "bad.safetensors", **case), msg)


def test_lying_entries(saved, tmp_path):
    entries = _entries(saved)

    def with_entries(es):
        return rewrite(saved, tmp_path / "bad.safetensors", meta={"compressed": json.dumps(es)})

    expect_error(with_entries(entries + [entries[0]]), "listed twice")
    expect_error(with_entries([dict(entries[0], dim=4)] + entries[1:]), "entry 0 .* is malformed")
    expect_error(with_entries([dict(entries[0], view=[16, 144])] + entries[1:]),
                 r"grouped as view \(16, 144\) dim 1 in the file, but the model's layer groups it as view "
                 r"\(16, 16, 3, 3\) dim 1")
    expect_error(with_entries([dict(entries[0], dtype="float16")] + entries[1:]), "is float16 .* in the file but float32")
    e = dict(entries[0], name="nope.weight")
    expect_error(with_entries([e] + entries[1:]), "compressed tensor 'nope.weight' is not in the model")
    expect_error(with_entries([dict(entries[0], name="bn1.bias", shape=[16], view=[16], dim=0)] + entries[1:]),
                 "missing from the file")


def test_load_into_a_sparsified_model_asks_for_a_plain_one(saved):
    model = fresh()
    nmsparse.sparsify(model, 2, 4)
    with pytest.raises(ValueError, match="has parametrizations .* call nmsparse.finalize"):
        load_compressed(saved, model)
    with pytest.raises(ValueError, match="needs an nn.Module"):
        load_compressed(saved, {})


def test_mismatched_models(saved, tmp_path):
    expect_error(saved, r"has dtype torch.float32 in the file but torch.float16 in the model", fresh(torch.float16))
    expect_error(saved, "'layers.0.1.bn1.bias' of the model is missing from the file",
                 build_model("resnet20"))
    other = fresh()
    other.fc = nn.Linear(64, 5)
    expect_error(saved, r"'fc.weight' has shape \(10, 64\) in the file but \(5, 64\) in the model", other)


def test_corrupt_and_truncated_files(saved, tmp_path):
    raw = saved.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for data, msg in [(raw[: len(raw) // 2], "not a valid nmsparse compressed file"),
                      (raw[:5], "not a valid"),
                      (b"", "not a valid"),
                      (struct.pack("<Q", 1 << 40) + raw[8:], "not a valid"),
                      (b"\x00" * 64, "not a valid")]:
        bad.write_bytes(data)
        expect_error(bad, msg)
    # a header whose offsets do not add up: the last tensor's end moved by 4 bytes
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[name]["data_offsets"][1] -= 4
    text = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + hlen:])
    expect_error(bad, "not a valid")
    expect_error(tmp_path / "missing.safetensors", "is not a file")
    with pytest.raises(FormatError, match="not a readable safetensors"):
        read_header(bad)


def test_format_error_is_a_load_error(saved, tmp_path):
    """``except LoadError`` catches a bad compressed file and a bad checkpoint alike; FormatError keeps
    its own message (no "cannot load" prefix) and stays a ValueError for older callers."""
    from nmsparse.plumbing.io import read_safetensors

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(saved.read_bytes()[:100])
    caught = []
    for load in (lambda: load_compressed(bad, fresh()), lambda: read_safetensors(bad)):
        try:
            load()
        except nmsparse.LoadError as e:
            caught.append(e)
    fmt, other = caught
    assert type(fmt) is FormatError and type(other) is LoadError and isinstance(fmt, ValueError)
    assert str(fmt).startswith(f"{bad} is not a valid nmsparse compressed file: ")
    assert fmt.path == str(bad) and fmt.problem.startswith("is not a valid nmsparse compressed file: ")
    assert fmt.hint is None and fmt.action == "cannot load"
    hinted = fmt.with_hint("export it again")
    assert type(hinted) is FormatError and str(hinted) == f"{fmt}; export it again" and hinted.path == fmt.path
    assert str(FormatError("no path here")) == "no path here" and FormatError("x").path == ""


def test_corruption_in_the_last_tensor_leaves_the_model_unchanged(saved, tmp_path):
    idx = torch.full((256,), 0b11_01_11_01, dtype=torch.uint8)  # every group: positions 1, 3
    idx[-1] = 0b01_01_01_00  # group 510: positions 0, 1; group 511 (the last): 1, 1
    expect_error(rewrite(saved, tmp_path / "bad.safetensors", tensors={LAST + "::nm_index": idx}),
                 r"corrupt index: group 511 \(w\[63, 28:32, 0, 0\]\) stores positions \[1, 1\]")


# ---- Hugging Face ----

def test_hf_bert_and_gpt2_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfgs = [transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=32),
            transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)]
    for cfg in cfgs:
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(cfg).eval()
        with torch.no_grad():
            for mod in model.modules():
                axis = group_axis(mod)
                if axis is not None:
                    mod.weight.mul_(nmsparse.nm_mask(mod.weight, 2, 4, dim=axis[1]))
        path = tmp_path / f"{cfg.model_type}.safetensors"
        r = save_compressed(model, path)
        assert (r.n, r.m) == (2, 4) and len(r.compressed) == (13 if cfg.model_type == "bert" else 8)  # + BERT's pooler
        torch.manual_seed(1)
        target = transformers.AutoModel.from_config(cfg).eval()
        load_compressed(path, target)
        assert_same_state(model, target)
        ids = torch.randint(0, 100, (2, 7))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).last_hidden_state, target(input_ids=ids).last_hidden_state)
