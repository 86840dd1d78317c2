"""nmsparse.plumbing.checksum (issue 19, D1) and the one-line messages of D7-D13 (non-ONNX).

The checksum: what :func:`sign` records, that :func:`verify` names the first bad tensor, the metadata,
a damaged record, tensors added, dropped or renamed; files written before checksums load with a note;
every nmsparse reader verifies (load_compressed, read_header, read_safetensors, checkpoint.load,
prune/export --checkpoint).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import nmsparse
from nmsparse.plumbing import checksum
from nmsparse.cli.dispatch import main
from nmsparse.plumbing.errors import LoadError
from nmsparse.export import FormatError, load_compressed, read_header, save_compressed
from nmsparse.plumbing.io import read_safetensors
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.models import build_model


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 8, generator=g), "b": torch.arange(6, dtype=torch.int64),
            "c": torch.randn(3, generator=g).to(torch.bfloat16), "d": torch.tensor(True), "e": torch.zeros(0, 2)}


# --- the module --------------------------------------------------------------------------------

def test_sign_and_verify_round_trip(tmp_path):
    t = tensors()
    meta = checksum.sign(t, {"config": "{}"})
    rec = json.loads(meta[checksum.KEY])
    assert rec["algorithm"] == "sha256" and list(rec["tensors"]) == list(t) and meta["config"] == "{}"
    assert rec["tensors"]["a"] == checksum.tensor_digest(t["a"].clone())
    assert checksum.tensor_digest(t["a"].t().contiguous().t()) == rec["tensors"]["a"]  # memory layout: same values
    assert checksum.tensor_digest(t["a"].reshape(8, 4)) != rec["tensors"]["a"]  # the shape counts
    assert checksum.tensor_digest(t["a"].view(torch.int32)) != rec["tensors"]["a"]  # so does the dtype
    save_file(t, str(tmp_path / "f"), metadata=meta)
    got, md = read_safetensors(tmp_path / "f")
    assert md == meta and all(torch.equal(got[k], t[k]) for k in t)
    assert checksum.sign(t, meta) == meta  # signing again replaces the entry


def test_parallel_digests_equal_serial():
    big = {f"w{i}": torch.randn(1 << 20) for i in range(4)}  # 16 MB: hashed on several threads
    rec = json.loads(checksum.sign(big)[checksum.KEY])["tensors"]
    assert rec == {k: checksum.tensor_digest(v) for k, v in big.items()}


@pytest.mark.parametrize("change,msg", [
    (lambda t, m: t["c"].view(torch.int16).__ixor__(1), "tensor 'c' differs from what was written"),
    (lambda t, m: (t["a"].__setitem__((0, 0), 1e30), t["c"].view(torch.int16).__ixor__(1)),
     "tensor 'a' differs"),  # the first bad tensor in the order written
    (lambda t, m: m.__setitem__("config", '{"lr": 1}'), "its metadata differs from what was written"),
    (lambda t, m: t.pop("b"), "tensor 'b' recorded when it was written is missing"),
    (lambda t, m: t.__setitem__("z", torch.zeros(1)), "tensor 'z' is not among those recorded"),
    (lambda t, m: t.__setitem__("b2", t.pop("b")), "tensor 'b2' is not among those recorded"),
    (lambda t, m: m.__setitem__(checksum.KEY, m[checksum.KEY][:-3]), "has a damaged checksum entry"),
    (lambda t, m: m.__setitem__("nmsparse_chbcksum", m.pop(checksum.KEY)),
     "has a damaged checksum entry \\(metadata key 'nmsparse_chbcksum'\\)"),
])
def test_verify_names_the_problem(change, msg):
    t = tensors()
    meta = checksum.sign(t, {"config": "{}"})
    change(t, meta)
    with pytest.raises(LoadError, match=f"^cannot load f.st: (fails its checksum: )?{msg}") as e:
        checksum.verify("f.st", t, meta)
    assert "\n" not in str(e.value) and str(e.value).endswith("write it again, or use a good copy")


def test_unverified_files_load_with_a_note(tmp_path):
    t = tensors()
    save_file(t, str(tmp_path / "old.safetensors"), metadata={"config": "{}"})
    with pytest.warns(checksum.UnverifiedFileWarning, match="old.safetensors carries no checksum .* loaded unverified"):
        got, _ = read_safetensors(tmp_path / "old.safetensors")
    assert torch.equal(got["a"], t["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checksum.verify("x", t, {}, note=False) is False
        read_safetensors(tmp_path / "old.safetensors", note=False)


# --- every reader verifies ---------------------------------------------------------------------

def resnet_24():
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, 2, 4)
    return nmsparse.finalize(model)


def test_load_compressed_names_the_damaged_tensor_and_leaves_the_model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(resnet_24(), path, 2, 4)
    t = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    key = "layers.1.0.conv2.weight::nm_values"
    t[key].view(torch.int32)[0, 0, 0, 0] ^= 1 << 30  # one exponent bit of a kept value
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
    model = build_model("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match=f"bad.safetensors: fails its checksum: tensor '{key}' differs"):
        load_compressed(tmp_path / "bad.safetensors", model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    meta = dict(meta, n="2 ")  # metadata changed: read_header refuses too
    save_file(load_file(str(path)), str(tmp_path / "meta.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match="its metadata differs"):
        read_header(tmp_path / "meta.safetensors")


def test_old_compressed_files_load_with_a_note(tmp_path):
    path = tmp_path / "m.safetensors"
    model = resnet_24()
    save_compressed(model, path, 2, 4)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != checksum.KEY}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.warns(checksum.UnverifiedFileWarning, match="old.safetensors carries no checksum"):
        load_compressed(tmp_path / "old.safetensors", build_model("resnet"))


def test_checkpoint_checksum_and_note(tmp_path):
    state = {"format": ckpt.FORMAT, "epoch": 1, "config": {}, "model": {"w": torch.ones(3)}, "optimizer": {},
             "scheduler": {}, "rng": {"torch": torch.get_rng_state()}, "sad": {"initial": {}, "previous": {}},
             "records": [{}]}
    ckpt.save(tmp_path / "c.pt", state)
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    saved["chebksum"] = saved.pop("checksum")  # the entry's name damaged
    torch.save(saved, tmp_path / "renamed.pt")
    with pytest.raises(LoadError, match="checksum entry is stored under a damaged name 'chebksum'"):
        ckpt.load(tmp_path / "renamed.pt")
    del saved["chebksum"]  # written before checksums existed
    torch.save(saved, tmp_path / "old.pt")
    with pytest.warns(checksum.UnverifiedFileWarning, match="old.pt carries no checksum"):
        assert ckpt.load(tmp_path / "old.pt")["epoch"] == 1


# --- the CLIs ------------------------------------------------------------------------------------

def _final(tmp_path, model=None, sign=True, **config):
    torch.manual_seed(0)
    model = model or build_model("mlp", image_size=8, in_channels=1, num_classes=10)
    t = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps({"model": "mlp", "data": "digits", **config})}
    path = tmp_path / "final.safetensors"
    save_file(t, str(path), metadata=checksum.sign(t, meta) if sign else meta)
    return path


def test_cli_note_for_an_unverified_checkpoint(tmp_path, capsys):
    path = _final(tmp_path, sign=False)
    assert main(["export", "--checkpoint", str(path), "--format", "dense", "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert err == f"nmsparse export: note: {path} carries no checksum (written before nmsparse recorded one): " \
                  "loaded unverified\n"


def test_cli_refuses_a_damaged_checkpoint(tmp_path, capsys):
    path = _final(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # inside the last tensor
    path.write_bytes(bytes(raw))
    for argv in (["export", "--checkpoint", str(path), "--out", str(tmp_path / "e")],
                 ["prune", "--checkpoint", str(path), "--out", str(tmp_path / "p"), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot load {path}: fails its checksum: tensor 'net.5." in err
        assert err.strip().endswith("differs from what was written ((10, 256) float32); the file is damaged: write it "
                                    "again, or use a good copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.safetensors"]


@pytest.mark.parametrize("nm,msg", [("2:4:8", "--nm must look like 2:4 .* got '2:4:8'$"),
                                    ("a:b", "--nm must look like 2:4 .* got 'a:b'$"),
                                    ("4:4", "--nm 4:4: need 0 < N < M")])
def test_prune_nm_messages(tmp_path, capsys, nm, msg):
    assert main(["prune", "--checkpoint", str(_final(tmp_path)), "--nm", nm, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    import re

    assert re.search(msg, err.strip()), err


def test_train_nm_that_fits_no_layer(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = main(["train", "--data", "digits", "--model", "mlp", "--nm", "2:3", "--epochs", "1", "--no-progress",
                   "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "UserWarning" not in err and "SADTracker" not in err, err
    assert err.startswith("nmsparse train: error: --nm 2:3 makes no layer of model 'mlp' on 'digits' N:M (")
    assert "net.3.weight: input features size 256 is not a multiple of m=3" in err and "e.g. 2:4" in err
    assert not (tmp_path / "r").exists()


def test_export_nm_that_would_make_the_file_larger(tmp_path, capsys):
    model = build_model("mlp", image_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for lin in (model.net[1], model.net[3], model.net[5]):
            lin.weight.mul_(nmsparse.nm_mask(lin.weight, 2, 4, dim=1))
    path = _final(tmp_path, model)
    out = tmp_path / "e"
    assert main(["export", "--checkpoint", str(path), "--nm", "1:4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("nmsparse export: error: --nm 1:4 compresses no layer weight of this model (its layers are "
                           "2:4): the file would be larger than the dense one; pass --nm 2:4 or --nm auto")
    assert not out.exists()
    # 7:8 in fp16 compresses (one zero in every 8) but takes more bytes than dense: a warning
    with torch.no_grad():
        for lin in (model.net[1], model.net[3], model.net[5]):
            lin.weight.copy_(torch.randn_like(lin.weight) * nmsparse.nm_mask(torch.randn_like(lin.weight), 7, 8, dim=1))
    path = _final(tmp_path, model)
    assert main(["export", "--checkpoint", str(path), "--nm", "7:8", "--dtype", "fp16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: at 7:8 the compressed tensors take" in err and "more than the" in err


def test_docs_export_md_says_conv1d_is_handled():
    """docs/export.md once said GPT-2's Conv1D blocks are left dense; sparsify handles them (issue 19, D12)."""
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    assert "Conv1D is not supported" not in text and "handle them like a `Linear`" in text
    model = transformers.AutoModel.from_config(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                                                       n_positions=16))
    report = nmsparse.sparsify(model, 2, 4)
    assert {e.kind for e in report.sparse} == {"Conv1D"} and len(report.sparse) == 6
