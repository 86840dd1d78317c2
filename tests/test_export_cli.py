"""``nmsparse export``: the three formats, checkpoints and Hugging Face folders, the size table and
export_report.json, and bad input (exit 2, one line on stderr, nothing written)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nmsparse
from nmsparse.plumbing import checksum
from nmsparse.cli.dispatch import main
from nmsparse.export import load_compressed
from nmsparse.training.models import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def finalized(n=2, m=4):
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, n, m)
    return nmsparse.finalize(model)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A final.safetensors as 'nmsparse train' writes it (training config in the metadata)."""
    d = tmp_path_factory.mktemp("run")
    model = finalized()
    meta = {"config": json.dumps({"model": "resnet", "data": "fashion-mnist", "nm": "2:4", "layout": "channels"})}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "final.safetensors"), metadata=checksum.sign(state, meta))
    return d / "final.safetensors", model


def run(capsys, *argv):
    rc = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_nmsparse_fp16(ckpt, tmp_path, capsys):
    path, model = ckpt
    rc, out, err = run(capsys, "--checkpoint", path, "--format", "nmsparse", "--dtype", "fp16", "--out", tmp_path / "e")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.json", "export_report.json",
                                                                  "model.nmsparse.safetensors"]
    assert "layers.2.0.conv2.weight" in out and "8 N:M layers" in out and "56.2%" in out
    rep = json.loads((tmp_path / "e" / "export_report.json").read_text())
    assert (rep["format"], rep["dtype"], rep["nm"], rep["layout"]) == ("nmsparse", "fp16", "2:4", "channels")
    r = rep["report"]
    assert r["sparse_layers_stored_bytes"] / r["sparse_layers_dense_bytes"] == pytest.approx(0.5625)
    assert r["file_bytes"] == (tmp_path / "e" / "model.nmsparse.safetensors").stat().st_size
    assert r["path"] == str(tmp_path / "e" / "model.nmsparse.safetensors")
    assert json.loads((tmp_path / "e" / "config.json").read_text())["model"] == "resnet"
    target = load_compressed(tmp_path / "e" / "model.nmsparse.safetensors", build_model("resnet").half())
    for k, v in copy.deepcopy(model).half().state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary folder left


def test_dense_bf16_and_overwrite(ckpt, tmp_path, capsys):
    path, model = ckpt
    rc, out, err = run(capsys, "--checkpoint", path, "--format", "dense", "--dtype", "bf16", "--out", tmp_path)
    assert rc == 0, err
    state = load_file(str(tmp_path / "model.safetensors"))
    for k, v in copy.deepcopy(model).to(torch.bfloat16).state_dict().items():
        assert torch.equal(v, state[k]), k
    assert json.loads((tmp_path / "export_report.json").read_text())["report"]["format"] == "dense"
    rc, _, err = run(capsys, "--checkpoint", path, "--format", "dense", "--out", tmp_path)
    assert rc == 2 and "already holds an export; pass --overwrite" in err
    rc, _, err = run(capsys, "--checkpoint", path, "--format", "dense", "--out", tmp_path, "--overwrite")
    assert rc == 0 and load_file(str(tmp_path / "model.safetensors"))["fc.weight"].dtype == torch.float32


def test_out_in_a_new_folder_on_another_file_system(ckpt, tmp_path, capsys, monkeypatch):
    """--out whose parents do not exist yet, on another file system than the working folder: the
    temporary folder goes beside the nearest existing parent, not into the working folder (which made
    os.replace fail with EXDEV, a traceback)."""
    import shutil
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    monkeypatch.chdir(tmp_path)
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        path, _ = ckpt
        rc, _, err = run(capsys, "--checkpoint", path, "--format", "dense", "--out", other / "a" / "b")
        assert rc == 0, err
        assert (other / "a" / "b" / "model.safetensors").is_file() and list(tmp_path.iterdir()) == []
        assert [p.name for p in other.iterdir()] == ["a"]  # no temporary folder left
    finally:
        shutil.rmtree(other)


def test_nm_auto_detects_when_nothing_recorded(tmp_path, capsys):
    model = finalized(4, 8)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    rc, out, err = run(capsys, "--checkpoint", tmp_path / "w.safetensors", "--model", "resnet", "--out", tmp_path / "e")
    assert rc == 0, err
    assert json.loads((tmp_path / "e" / "export_report.json").read_text())["nm"] == "4:8"
    rc, out, err = run(capsys, "--checkpoint", tmp_path / "w.safetensors", "--model", "resnet", "--nm", "2:4",
                       "--out", tmp_path / "f")
    # an N:M that compresses none of the 4:8 layers would only add a header: refused (issue 19)
    assert rc == 2 and "--nm 2:4 compresses no layer weight of this model (its layers are 4:8)" in err
    assert not (tmp_path / "f").exists()


def test_hf_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    nmsparse.sparsify(model, 2, 4, include="encoder.*", keep_dense=())
    nmsparse.finalize(model)
    model.save_pretrained(tmp_path / "hf")
    rc, out, err = run(capsys, "--hf-model", tmp_path / "hf", "--dtype", "fp16", "--out", tmp_path / "e")
    assert rc == 0, err
    assert "12 N:M layers" in out and "pooler.dense.weight" in out
    cfg2 = transformers.AutoConfig.from_pretrained(tmp_path / "e")
    target = transformers.AutoModel.from_config(cfg2).half()
    load_compressed(tmp_path / "e" / "model.nmsparse.safetensors", target)
    for k, v in model.half().state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def test_onnx_real_export(ckpt, tmp_path, capsys):
    """--format onnx through the real nmsparse.export.onnx: a file onnxruntime ran, every sparse
    initializer checked along TensorRT's axis, the report written next to it."""
    pytest.importorskip("onnxruntime")
    rc, out, err = run(capsys, "--checkpoint", ckpt[0], "--format", "onnx", "--out", tmp_path / "e")
    assert rc == 0, err
    rep = json.loads((tmp_path / "e" / "export_report.json").read_text())["report"]
    assert (tmp_path / "e" / "model.onnx").stat().st_size > 10_000
    statuses = {e["status"] for e in rep["initializers"]}
    assert "n:m" in statuses and "broken" not in statuses, statuses


def test_bad_input(ckpt, tmp_path, capsys):
    path, _ = ckpt
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    bare = tmp_path / "bare.safetensors"
    save_file(finalized().state_dict(), str(bare), metadata=checksum.sign(finalized().state_dict()))
    (tmp_path / "nohf").mkdir()
    odd = {}
    for key, config in (("data", {"model": "resnet", "data": "cifar"}), ("layout", {"model": "resnet", "layout": "rows"})):
        odd[key] = tmp_path / f"odd_{key}.safetensors"
        state = finalized().state_dict()
        save_file(state, str(odd[key]), metadata=checksum.sign(state, {"config": json.dumps(config)}))
    (tmp_path / "adir").mkdir()
    torch.save({"a": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    cases = [
        (["--checkpoint", tmp_path / "nope"], "cannot load .*nope: not found; pass the final.safetensors"),
        (["--checkpoint", tmp_path / "adir"], "adir: is a directory, not a file"),
        (["--checkpoint", tmp_path / "checkpoint.pt"], "checkpoint.pt: is a torch.save archive .*not a safetensors"),
        (["--checkpoint", path, "--format", "tflite"], "unknown --format 'tflite'"),
        (["--checkpoint", path, "--dtype", "int8"], "unknown --dtype 'int8'"),
        (["--checkpoint", path, "--nm", "2-4"], "--nm must be 'auto' or N:M with whole numbers .* got '2-4'$"),
        (["--checkpoint", path, "--nm", "2:4:8"], "--nm must be 'auto' or N:M with whole numbers .* got '2:4:8'$"),
        (["--checkpoint", path, "--nm", "a:b"], "--nm must be 'auto' or N:M with whole numbers .* got 'a:b'$"),
        (["--checkpoint", path, "--nm", "4:4"], "--nm 4:4: need 0 < N < M"),
        (["--checkpoint", path, "--layout", "rows"], "unknown --layout 'rows'"),
        (["--checkpoint", path, "--model", "alexnet"], "unknown --model 'alexnet'"),
        (["--checkpoint", path, "--model", "mlp"], r"does not fit model 'mlp' on 'fashion-mnist' \(\d+ tensor\(s\) "
                                                   r"missing \(.*; it records model 'resnet'"),
        (["--checkpoint", bare], "records no model; pass --model"),
        (["--checkpoint", garbage], "cannot load .*garbage.safetensors: is not a safetensors file"),
        (["--checkpoint", odd["data"]], "dataset 'cifar' is unknown"),
        (["--checkpoint", odd["layout"]], "records layout 'rows'; pass --layout"),
        (["--hf-model", tmp_path / "nohf"], "not a Hugging Face model folder"),
        (["--hf-model", tmp_path / "nohf", "--model", "resnet"], "--model names the architecture of --checkpoint"),
        (["--checkpoint", path, "--hf-model", tmp_path / "nohf"], "not allowed with argument"),
        (["--checkpoint", path, "--out", garbage], "exists and is not a folder"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, msg in cases:
        if "--out" not in argv:
            argv = argv + ["--out", tmp_path / "e"]
        with pytest.raises(SystemExit) if "--hf-model" in argv and "--checkpoint" in argv else _nullctx() as ex:
            rc, out, err = run(capsys, *argv)
        if ex is not None:
            rc, err = ex.value.code, capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        import re

        assert re.search(msg, err.strip()), (msg, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_onnx_contract_with_a_stand_in(ckpt, tmp_path, capsys, monkeypatch):
    """--format onnx calls nmsparse.export.onnx.export_onnx(model, example_inputs, path, n=, m=, layout=)
    with the model in the requested dtype and writes its report; an export failure is one line and leaves
    nothing (a stand-in module records the call, so fp16 needs no onnxruntime fp16 kernels)."""
    import sys
    import types

    calls = []

    class Report:
        def to_dict(self):
            return {"layers": 8}

        def table(self):
            return "stand-in table"

    def export_onnx(model, example_inputs, path, *, n, m, layout="channels"):
        calls.append((type(model).__name__, [tuple(x.shape) for x in example_inputs], n, m, layout,
                      next(model.parameters()).dtype))
        open(path, "wb").write(b"onnx")
        return Report()

    fake = types.ModuleType("nmsparse.export.onnx")
    fake.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "nmsparse.export.onnx", fake)
    rc, out, err = run(capsys, "--checkpoint", ckpt[0], "--format", "onnx", "--dtype", "fp16", "--out", tmp_path / "e")
    assert rc == 0, err
    assert calls == [("ResNet", [(1, 1, 28, 28)], 2, 4, "channels", torch.float16)]
    assert "stand-in table" in out and (tmp_path / "e" / "model.onnx").read_bytes() == b"onnx"
    assert json.loads((tmp_path / "e" / "export_report.json").read_text())["report"] == {"layers": 8}

    def failing(*a, **k):
        raise RuntimeError("Unsupported: op foo\nmore lines")

    fake.export_onnx = failing
    rc, out, err = run(capsys, "--checkpoint", ckpt[0], "--format", "onnx", "--out", tmp_path / "f")
    assert rc == 2 and err == "nmsparse export: error: ONNX export failed: Unsupported: op foo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_hf_causal_lm_keeps_its_head(tmp_path, capsys):
    """--hf-model builds the class the folder records (here LlamaForCausalLM, untied head), not the
    headless AutoModel: every tensor of the folder is exported under its own name."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    rc, out, err = run(capsys, "--hf-model", tmp_path / "hf", "--format", "dense", "--out", tmp_path / "e")
    assert rc == 0, err
    from safetensors.torch import load_file

    got = load_file(tmp_path / "e" / "model.safetensors")
    assert set(got) == set(model.state_dict()) and "lm_head.weight" in got


def test_onnx_external_data_is_kept(ckpt, tmp_path, capsys, monkeypatch):
    """A large model's ONNX export writes model.onnx plus model.onnx.data: both must reach --out."""
    import sys
    import types

    class Report:
        def to_dict(self):
            return {}

        def table(self):
            return "t"

    def export_onnx(model, example_inputs, path, *, n, m, layout="channels"):
        open(path, "wb").write(b"onnx")
        open(str(path) + ".data", "wb").write(b"weights")
        return Report()

    fake = types.ModuleType("nmsparse.export.onnx")
    fake.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "nmsparse.export.onnx", fake)
    rc, out, err = run(capsys, "--checkpoint", ckpt[0], "--format", "onnx", "--out", tmp_path / "e")
    assert rc == 0, err
    assert (tmp_path / "e" / "model.onnx.data").read_bytes() == b"weights"
