"""``nmsparse inspect``: the finest N:M pattern per weight, for every kind of file, and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nmsparse
from nmsparse import is_nm, nm_mask, transposable_mask
from nmsparse.cli.dispatch import main
from nmsparse.plumbing.errors import LoadError
from nmsparse.inspection import finest_pattern, inspect

FIX = Path(__file__).parent / "fixtures" / "compressed_tensors"


def _nm(rows, cols, n, m, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w, n, m, dim=1)


def _brute(t, dim):
    """Reference: every (n, m) with m in 4, 8, 16 that is_nm accepts; the lowest n/m, then smallest m."""
    ok = [(n / m, m, n) for m in (4, 8, 16) if t.shape[dim] % m == 0 for n in range(0, m) if is_nm(t, max(n, 1), m, dim)
          and int((t != 0).movedim(dim, -1).reshape(-1, m).sum(-1).max()) == n]
    return min(ok) if ok else None


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (6, 8), (4, 16), (2, 16)]),
       st.integers(1, 4), st.integers(1, 3), st.integers(0, 10_000), st.booleans())
def test_finest_pattern_matches_brute_force(nm, rows, groups, seed, extra_zeros):
    n, m = nm
    t = _nm(rows * 4, groups * 16, n, m, seed)
    if extra_zeros:
        t[0] = 0
    p = finest_pattern(t, 1)
    ref = _brute(t, 1)
    assert ref is not None and (p.n / p.m, p.m, p.n) == ref
    assert p.n / p.m <= n / m and is_nm(t, p.n, p.m, dim=1) and p.label == f"{p.n}:{p.m}"
    assert math.isclose(p.zeros, int((t == 0).sum()) / t.numel())
    assert p.two_four == is_nm(t, 2, 4, dim=1)  # 2:8, 1:8, 2:16... are 2:4 too


def test_named_patterns():
    assert finest_pattern(_nm(8, 16, 2, 4), 1).label == "2:4"
    assert finest_pattern(_nm(8, 16, 1, 4), 1).label == "1:4"
    w48 = _nm(8, 16, 4, 8)
    assert not is_nm(w48, 2, 4) and finest_pattern(w48, 1).label == "4:8"
    assert finest_pattern(_nm(8, 16, 2, 4), 0).label != "2:4"  # the other axis is not 2:4
    assert finest_pattern(torch.randn(4, 16), 1).label == "dense"
    t = torch.randn(4, 16)
    t[:, :8] = 0  # 8 zeros then 8 non-zeros per row: 8:16, nothing finer
    assert finest_pattern(t, 1).label == "8:16"
    t = torch.randn(4, 16)
    t[1:] = 0  # one full row left: its groups, of any m, have no zero
    assert finest_pattern(t, 1).label == "unstructured 75.0% zeros"
    assert finest_pattern(torch.zeros(4, 8), 1).label == "all zeros"
    assert finest_pattern(torch.randn(4, 6), 1).label == "dense"  # no m divides 6


def test_transposable():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    p = finest_pattern(w * transposable_mask(w, 2, 4), 1)
    assert p.label == "2:4" and p.transposable is True
    assert finest_pattern(_nm(16, 16, 2, 4, seed=3), 1).transposable is False


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight, 2, 4, dim=1))
    return model


def _by_name(report):
    return {t.name: t for t in report.tensors}


def test_summary_counts_finer_patterns_that_are_2_4(tmp_path):
    """A 2:8 weight is reported as 2:8 and it runs on 2:4 kernels; a 4:8 one does not."""
    w28, w48 = _nm(32, 16, 2, 8, seed=1), _nm(32, 16, 4, 8, seed=2)
    save_file({"a.weight": w28, "b.weight": w48}, str(tmp_path / "m.safetensors"))
    r = inspect(tmp_path / "m.safetensors")
    t = _by_name(r)
    assert t["a.weight"].pattern == "2:8" and t["a.weight"].two_four
    assert t["b.weight"].pattern == "4:8" and not t["b.weight"].two_four
    assert r.summary().endswith("; 50.0% can run on 2:4 kernels (sparse tensor cores, nmsparse's CPU kernel)")


@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_conv_layouts(tmp_path, layout):
    """A conv weight is measured along its input channels (what TensorRT reads); one pruned in
    nmsparse's flat layout says so in its note rather than look like a failed 7:8."""
    conv = torch.nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight.mul_(nmsparse.layer_mask(conv.weight, 2, 4, layout))
    save_file({"conv.weight": conv.weight.detach().contiguous()}, str(tmp_path / "m.safetensors"))
    t = _by_name(inspect(tmp_path / "m.safetensors"))["conv.weight"]
    assert t.axis == 1 and t.shape == (16, 8, 3, 3)
    save_file({"vit.embeddings.patch_embeddings.projection.weight": conv.weight.detach().contiguous()},
              str(tmp_path / "vit.safetensors"))  # a conv, not an embedding table, despite its name
    assert inspect(tmp_path / "vit.safetensors").tensors[0].axis == 1
    if layout == "channels":
        assert t.pattern == "2:4" and t.note == ""
    else:
        assert t.pattern != "2:4" and t.note == "2:4 in the flat layout (in x kernel)"


def test_transposed_weight_without_config(tmp_path):
    """GPT-2's Conv1D (in, out) in a file with no config.json beside it: measured as a Linear, along
    axis 1, where it is not N:M; the note says it is N:M along axis 0."""
    w = _nm(16, 32, 2, 4).T.contiguous()  # (in=32, out=16), 2:4 along dim 0
    save_file({"h.0.attn.c_attn.weight": w}, str(tmp_path / "m.safetensors"))
    t = inspect(tmp_path / "m.safetensors").tensors[0]
    assert t.axis == 1 and t.pattern != "2:4"
    assert t.note == "2:4 along axis 0 (a transposed layout, e.g. GPT-2's Conv1D?)"
    save_file({"x.weight": _nm(16, 32, 2, 4)}, str(tmp_path / "ok.safetensors"))
    assert inspect(tmp_path / "ok.safetensors").tensors[0].note == ""  # N:M along its axis: no note


def test_safetensors_file(tmp_path):
    save_file(_model().state_dict(), str(tmp_path / "m.safetensors"))
    r = inspect(tmp_path / "m.safetensors")
    t = _by_name(r)
    assert r.kind == "safetensors" and set(t) == {"0.weight", "2.weight"}
    assert t["0.weight"].pattern == "2:4" and t["0.weight"].axis == 1 and t["2.weight"].pattern == "dense"
    assert t["0.weight"].shape == (32, 16) and t["0.weight"].dtype == "float32"
    assert r.other_params == 40  # the biases
    assert r.summary().startswith("1 of 2 weight tensors N:M, 66.7% of 768 weight parameters (2:4: 66.7%)")
    assert nmsparse.inspect(tmp_path / "m.safetensors").to_dict()["summary"] == r.summary()


def test_hf_folder_sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(nm_mask(model.model.layers[1].mlp.down_proj.weight, 1, 4, 1))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    r = inspect(tmp_path)
    t = _by_name(r)
    assert r.kind == "hf-folder" and t["model.layers.1.mlp.down_proj.weight"].pattern == "1:4"
    assert t["model.embed_tokens.weight"].axis is None  # an embedding is not a matmul weight
    assert t["model.layers.0.mlp.up_proj.weight"].pattern == "dense"


@pytest.mark.parametrize("name", ["llama_bf16", "llama_fp8_channel", "llama_fp8_tensor"])
def test_compressed_tensors_folder(name):
    r = inspect(FIX / name)
    w = r.weights()
    assert r.kind == "compressed-tensors" and len(w) == 15
    sparse = [t for t in w if t.note == "sparse-24-bitmask"]
    assert len(sparse) == 14 and all(t.pattern == "2:4" for t in sparse)
    assert all(t.dtype == ("bfloat16" if name == "llama_bf16" else "float8_e4m3fn") for t in sparse)
    assert _by_name(r)["lm_head.weight"].pattern == "dense"
    assert bool(r.notes) == (name != "llama_bf16")
    assert not any(t.name.endswith("_scale") for t in r.tensors)  # scales count as other parameters


def test_nmsparse_compressed_file(tmp_path):
    from nmsparse.export import save_compressed

    save_compressed(_model(), tmp_path / "m.nmsparse.safetensors", 2, 4)
    r = inspect(tmp_path / "m.nmsparse.safetensors")
    t = _by_name(r)
    assert r.kind == "nmsparse-compressed"
    assert t["0.weight"].pattern == "2:4" and t["0.weight"].note == "stored 2:4" and t["0.weight"].shape == (32, 16)
    assert t["2.weight"].pattern == "dense"


def test_training_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    nmsparse.sparsify(model, 2, 4, keep_dense=())
    torch.save({"format": 1, "epoch": 3, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    r = inspect(tmp_path / "checkpoint.pt")
    t = _by_name(r)
    assert r.kind == "checkpoint" and set(t) == {"0.weight", "1.weight"}
    assert all(v.pattern == "2:4" for v in t.values())  # original * mask, as the model computes


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil()}, tmp_path / "bad.pt")
    with pytest.raises(LoadError, match="refused"):
        inspect(tmp_path / "bad.pt")
    assert "code ran" not in capsys.readouterr().out


def test_onnx_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = _nm(8, 16, 2, 4).T.contiguous()  # MatMul's B is (in, out): groups run along axis 0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w.numpy(), "W"), numpy_helper.from_array(torch.ones(3).numpy(), "unused")])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    r = inspect(tmp_path / "m.onnx")
    t = _by_name(r)
    assert r.kind == "onnx" and t["W"].axis == 0 and t["W"].pattern == "2:4" and t["W"].note == "MatMul"
    assert r.other_params == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_onnx_file_low_precision(tmp_path, dtype):
    """bf16 (what export --dtype bf16 writes) and float8 initializers: ml_dtypes arrays in onnx."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    w = _nm(8, 16, 2, 4).T.contiguous().to(dtype)
    kind = {torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16,
            torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}[dtype]
    init = helper.make_tensor("W", kind, list(w.shape), w.view(torch.uint8).numpy().tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", kind, [1, 16])],
                              [helper.make_tensor_value_info("y", kind, [1, 8])], [init])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    t = _by_name(inspect(tmp_path / "m.onnx"))["W"]
    assert t.dtype == str(dtype).replace("torch.", "") and t.axis == 0 and t.pattern == "2:4"


def test_onnx_weight_cast_before_its_matmul(tmp_path):
    """fp16 weights cast to float32 on the way to a MatMul (a common mixed-precision graph): the axis is
    the MatMul's, through the Cast, and the weight counts in the summary."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = _nm(8, 16, 2, 4).T.contiguous().half()  # (in, out): 2:4 along axis 0
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W"], ["W32"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "W32"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [numpy_helper.from_array(w.numpy(), "W")])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    r = inspect(tmp_path / "m.onnx")
    t = _by_name(r)["W"]
    assert t.axis == 0 and t.pattern == "2:4" and t.note == "Cast->MatMul" and r.weights() == [t]


def test_onnx_external_data(tmp_path, capsys):
    """Initializers in a .data file are read one at a time; a missing .data file is one line naming it."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = _nm(8, 16, 2, 4).T.contiguous()
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(w.numpy(), "W")])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    assert _by_name(inspect(tmp_path / "m.onnx"))["W"].pattern == "2:4"
    (tmp_path / "m.onnx.data").unlink()
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "initializer 'W' cannot be read" in err and "m.onnx.data" in err


def test_cli_table_and_json(tmp_path, capsys):
    save_file(_model().state_dict(), str(tmp_path / "m.safetensors"))
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "2:4" in out and out.strip().splitlines()[-1].startswith("1 of 2 weight tensors")
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "safetensors" and d["tensors"][0]["pattern"] == "2:4" and d["summary"]


@pytest.mark.parametrize("make,pattern", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("hello world, not a model"), "is not a file nmsparse inspect knows"),
    (None, "not found"),
])
def test_cli_bad_files_one_line_exit_2(tmp_path, capsys, make, pattern):
    p = tmp_path / "x.bin"
    if make:
        make(p)
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nmsparse inspect: error: ") and pattern in err


def test_damaged_files(tmp_path, capsys):
    save_file(_model().state_dict(), str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[:-50])
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 2
    assert "is truncated" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage" * 3)
    assert main(["inspect", str(tmp_path / "bad.onnx")]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert main(["inspect", str(tmp_path / "empty_dir")]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    save_file(_model().state_dict(), str(tmp_path / "empty_dir" / "final.safetensors"))  # a training run's folder
    assert main(["inspect", str(tmp_path / "empty_dir")]) == 2
    assert "(it holds final.safetensors: inspect one of those)" in capsys.readouterr().err


def test_damaged_compressed_tensors_folder(tmp_path, capsys):
    import shutil

    from safetensors import safe_open

    d = tmp_path / "f"
    shutil.copytree(FIX / "llama_bf16", d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.up_proj.bitmask"][0, 0] = 0xFF
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.layers.0.mlp.up_proj.bitmask sets 4 of the 4 bits" in err


def test_compressed_tensors_folder_missing_part(tmp_path, capsys):
    import shutil

    from safetensors import safe_open

    d = tmp_path / "f"
    shutil.copytree(FIX / "llama_bf16", d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.0.mlp.up_proj.bitmask"}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'model.layers.0.mlp.up_proj.bitmask' is missing" in err


def test_command_line_entry_point(tmp_path):
    save_file(_model().state_dict(), str(tmp_path / "m.safetensors"))
    r = subprocess.run([sys.executable, "-m", "nmsparse", "inspect", str(tmp_path / "nope")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
