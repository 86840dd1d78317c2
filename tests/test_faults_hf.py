"""Hugging Face paths (issue 19): block-wise pruning (``prune --hf-model``) writes checksummed shards
that its reader verifies, and a full disk is one line naming the user's ``--out`` (never the hidden
folder it builds in), with nothing left behind. Also ``export --format onnx`` on a full disk."""

from __future__ import annotations

import errno
import sys
import types

import pytest
import torch

from nmsparse.plumbing import checksum
from nmsparse.plumbing.errors import LoadError, WriteError

transformers = pytest.importorskip("transformers")

from test_faults_disk import full_disk  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "llama")
    return d / "llama"


def _prune(src, out):
    from nmsparse.pruning.blockwise import prune_pretrained

    calib = [torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))]
    return prune_pretrained(src, out, 2, 4, method="magnitude", calib=calib, progress="off")


def test_blockwise_shards_are_checksummed_and_verified(llama, tmp_path):
    from safetensors import safe_open

    from nmsparse.calibration.streaming import CheckpointReader

    out = tmp_path / "out"
    _prune(llama, out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 3
    for s in shards:
        with safe_open(str(s), "pt") as f:
            assert checksum.recorded(s, f.metadata()) is not None
    model = transformers.LlamaForCausalLM.from_pretrained(out)  # transformers reads them as usual
    own = model.state_dict()
    reader = CheckpointReader(out)
    reader.copy_into({k: torch.empty_like(own[k]) for k in reader.keys()})  # verified, no error
    raw = bytearray(shards[0].read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor of block 0's shard
    shards[0].write_bytes(bytes(raw))
    reader = CheckpointReader(out)
    with pytest.raises(LoadError, match=f"cannot load {shards[0]}: fails its checksum: tensor 'model.layers.0"):
        reader.copy_into({k: torch.empty_like(own[k]) for k in reader.keys()})


def test_blockwise_full_disk_names_out(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    full_disk(monkeypatch, 0)
    with pytest.raises(WriteError, match=rf"^cannot write {out}/model-00003-of-00003.safetensors: no space left on "
                                         "the device$"):
        _prune(llama, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no hidden folder beside --out


def test_onnx_export_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """--format onnx: whatever the exporter raises, a failed write is the user's path and the cause."""
    from test_integrity import _final

    from nmsparse.cli.dispatch import main

    def export_onnx(model, example_inputs, path, **kw):
        raise RuntimeError("the exporter failed") from OSError(errno.ENOSPC, "No space left on device", str(path))

    fake = types.ModuleType("nmsparse.export.onnx")
    fake.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "nmsparse.export.onnx", fake)
    path = _final(tmp_path)
    out = tmp_path / "e"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"nmsparse export: error: cannot write {out / 'model.onnx'}: no space left on the device\n"
    assert not out.exists()


def test_export_hf_model_verifies_nmsparse_shards(llama, tmp_path, capsys):
    """export --hf-model of a folder that prune --hf-model wrote: its shards' checksums are verified
    (transformers' loader would read a damaged shard without complaint)."""
    from nmsparse.cli.dispatch import main

    out = tmp_path / "pruned"
    _prune(llama, out)
    shard = out / "model-00001-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))
    assert main(["export", "--hf-model", str(out), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot load {shard}: fails its checksum: tensor 'model.layers.0." in err
    assert not (tmp_path / "e").exists()
