"""compressed-tensors' sparse-24-bitmask: the real 0.14.0.1 fixtures load to the exact tensors its own
reader rebuilds, our folders load back, and every bad folder is one FormatError naming the tensor."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from nmsparse import LoadError, finalize, is_nm, nm_mask, sparsify  # noqa: E402
from nmsparse.export import FormatError  # noqa: E402
from nmsparse.integrations.compressed_tensors import bitmask, load, save  # noqa: E402
from nmsparse.integrations.compressed_tensors.scheme import matches  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "compressed_tensors"
NAMES = ["llama_bf16", "llama_fp8_channel", "llama_fp8_tensor"]
Q = "model.layers.0.self_attn.q_proj"


def _load_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(path, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_real_fixtures_load_to_the_exact_tensors(name):
    model = _load_quiet(FIX / name)
    expected = load_file(str(FIX / "expected" / f"{name}.safetensors"))
    got = model.state_dict()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k
    # what we do not hold are compressed-tensors' quantization parameters, nothing else
    assert {k.rsplit(".", 1)[1] for k in set(expected) - set(got)} <= {"weight_scale", "input_scale"}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name != "lm_head":
            assert is_nm(mod.weight, 2, 4, dim=1) and mod.weight.dtype == torch.bfloat16


def test_fp8_load_says_it_dequantized():
    with pytest.warns(UserWarning, match=r"FP8 weights of 14 layer\(s\) dequantized to bfloat16 \(scales per channel\)"
                                         r".*float8 token dynamic\) is not applied"):
        load(FIX / "llama_fp8_channel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(FIX / "llama_bf16")  # nothing to say


def test_model_class_is_honoured():
    model = _load_quiet(FIX / "llama_bf16", model_class=transformers.LlamaForCausalLM)
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(FormatError, match=r"'model.layers.0.mlp.down_proj', which is not a Linear layer of LlamaModel"):
        _load_quiet(FIX / "llama_bf16", model_class=transformers.LlamaModel)  # the stored model has a head


def test_bitmask_matches_numpy_packbits_and_round_trips():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 20, generator=g) > 0.5
    assert np.array_equal(bitmask.pack_rows(mask).numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(bitmask.unpack_rows(bitmask.pack_rows(mask), 20), mask)
    w = torch.randn(6, 12, generator=g).bfloat16()
    w = w * nm_mask(w, 2, 4, dim=1)
    w[0, :4] = 0  # a group with no non-zero still stores 2 (zero) values
    parts = bitmask.compress24(w)
    assert parts["compressed"].shape == (6, 6) and parts["shape"].tolist() == [[6], [12]]
    assert torch.equal(bitmask.decompress24(parts["compressed"], parts["bitmask"], parts["shape"], "w"), w)
    with pytest.raises(ValueError, match="not 2:4 along its input features"):
        bitmask.compress24(torch.ones(2, 4))


def test_our_compression_is_byte_identical_to_compressed_tensors():
    with safe_open(str(FIX / "llama_bf16" / "model.safetensors"), "pt") as f:
        dense = bitmask.decompress24(f.get_tensor(f"{Q}.compressed"), f.get_tensor(f"{Q}.bitmask"),
                                     f.get_tensor(f"{Q}.shape"), Q)
        ours = bitmask.compress24(dense)
        for s in bitmask.SUFFIXES:
            assert torch.equal(ours[s], f.get_tensor(f"{Q}.{s}")), s


def test_target_matching_follows_compressed_tensors():
    lin = torch.nn.Linear(4, 4)
    assert matches("a.q_proj", lin, ["Linear"]) and matches("a.q_proj", lin, ["re:.*q_proj$"])
    assert matches("lm_head", lin, ["lm_head"]) and not matches("lm_head", lin, ["re:.*proj"])


def _tiny(seed=0, prune=True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    if prune:
        with torch.no_grad():
            for n, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and n != "lm_head" and "v_proj" not in n:
                    mod.weight.mul_(nm_mask(mod.weight, 2, 4, dim=1))
    return model


@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_then_load_round_trips(tmp_path, shard):
    model = _tiny()
    kw = {"max_shard_bytes": shard} if shard else {}
    report = save(model, tmp_path / "out", **kw)
    assert len(report.compressed) == 12
    assert set(report.dense) == {"lm_head", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}
    assert "not 2:4" in report.dense["lm_head"] and report.nbytes < report.dense_nbytes
    assert ("model.safetensors.index.json" in report.files) == bool(shard)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"]  # a model built from a config records none itself
    cfg = written["quantization_config"]
    assert cfg["sparsity_config"]["format"] == "sparse-24-bitmask" and cfg["quant_method"] == "compressed-tensors"
    assert cfg["sparsity_config"]["targets"] == ["Linear"] and "lm_head" in cfg["sparsity_config"]["ignore"]
    real = json.loads((FIX / "llama_bf16" / "config.json").read_text())["quantization_config"]
    assert set(cfg) == set(real) and set(cfg["sparsity_config"]) == set(real["sparsity_config"])  # what 0.14 writes
    back = load(tmp_path / "out")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(model(ids).logits, back(ids).logits)


def test_save_finalized_sparsified_model(tmp_path):
    model = _tiny(prune=False)
    sparsify(model, 2, 4, exclude=["lm_head"])
    with pytest.raises(ValueError, match="finalize"):
        save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    finalize(model)
    report = save(model, tmp_path / "a")
    sparse = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and is_nm(mod.weight, 2, 4, 1)}
    assert set(report.compressed) == sparse and len(sparse) >= 12 and "lm_head" in report.dense


def test_save_reports_conv1d_layers_left_dense(tmp_path):
    """GPT-2's Conv1D layers are not nn.Linear: each is listed dense with its reason (not silently
    dense), and only Linear layers go into sparsity_config.ignore."""
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                  tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(nm_mask(model.lm_head.weight, 2, 4, dim=1))
    report = save(model, tmp_path / "g")
    assert report.compressed == ["lm_head"]
    assert set(report.dense) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                 "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert all("Conv1D" in why for why in report.dense.values())
    q = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert q["sparsity_config"]["ignore"] == []


def test_save_does_not_copy_the_dense_tensors(tmp_path, monkeypatch):
    """The tensors stored as they are go to the writer without a copy (a full copy doubled the memory
    of saving a large model); a view sharing its storage is copied."""
    import nmsparse.integrations.compressed_tensors.write as write

    written = {}
    real = write.save_safetensors

    def spy(path, tensors, metadata=None):
        written.update(tensors)
        return real(path, tensors, metadata)

    monkeypatch.setattr(write, "save_safetensors", spy)
    model = _tiny()
    save(model, tmp_path / "o")
    assert written["lm_head.weight"].data_ptr() == model.lm_head.weight.data_ptr()
    assert written["model.norm.weight"].data_ptr() == model.model.norm.weight.data_ptr()
    assert torch.equal(_load_quiet(tmp_path / "o").lm_head.weight, model.lm_head.weight)
    model.model.norm.weight = torch.nn.Parameter(model.model.layers[0].input_layernorm.weight.data)  # one storage
    save(model, tmp_path / "p")
    assert written["model.norm.weight"].data_ptr() != written["model.layers.0.input_layernorm.weight"].data_ptr()


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="float32.*model.to\\(torch.bfloat16\\)"):
        save(_tiny().float(), tmp_path / "f")
    with pytest.raises(ValueError, match="has no Linear layer whose weight is 2:4"):
        save(_tiny(prune=False), tmp_path / "f")
    with pytest.raises(ValueError, match="needs a transformers model"):
        save(torch.nn.Linear(4, 4), tmp_path / "f")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        save(_tiny(), tmp_path / "busy")
    assert not (tmp_path / "f").exists() and (tmp_path / "busy" / "x").read_text() == "keep"


def test_save_to_a_new_folder_on_another_file_system(tmp_path, monkeypatch):
    """The temporary folder is made beside the nearest existing parent of ``folder`` (on its file
    system), not in the working folder: os.replace across file systems fails with EXDEV."""
    import os
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    monkeypatch.chdir(tmp_path)
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        save(_tiny(), other / "a" / "b")
        assert (other / "a" / "b" / "model.safetensors").is_file() and list(tmp_path.iterdir()) == []
        assert [p.name for p in other.iterdir()] == ["a"]
    finally:
        shutil.rmtree(other)


# -- bad folders: one FormatError naming the tensor, no model ------------------------------------------
def _copy(tmp_path, name="llama_bf16"):
    dst = tmp_path / name
    shutil.copytree(FIX / name, dst)
    return dst


def _rewrite(folder, fn, file="model.safetensors"):
    p = folder / file
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(p), metadata=meta)


def _config(folder, fn):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _refused(folder, pattern):
    with pytest.raises(FormatError, match=pattern) as e:
        _load_quiet(folder)
    assert isinstance(e.value, LoadError) and "\n" not in str(e.value)


def test_wrong_popcount(tmp_path):
    d = _copy(tmp_path)

    def flip(t):
        t[f"{Q}.bitmask"][3, 1] |= 0xFF
    _rewrite(d, flip)
    _refused(d, rf"{Q}\.bitmask sets 4 of the 4 bits of row 3, group 2 .*not a sparse-24-bitmask tensor")


def test_wrong_shape_tensor(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d, lambda t: t.__setitem__(f"{Q}.shape", torch.tensor([[16], [64]])))
    _refused(d, rf"{Q}.compressed has shape \(32, 16\), but {Q}.shape says \[16, 64\], which needs \(16, 32\)")


def test_compressed_of_the_wrong_size(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d, lambda t: t.__setitem__(f"{Q}.compressed", t[f"{Q}.compressed"][:, :8].clone()))
    _refused(d, rf"{Q}\.compressed has shape \(32, 8\).*needs \(32, 16\)")


def test_missing_part(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d, lambda t: t.pop(f"{Q}.bitmask"))
    _refused(d, rf"tensor '{Q}.bitmask' is missing")


def test_config_claims_24_but_dense_weight_is_not(tmp_path):
    d = _copy(tmp_path)

    def densify(t):
        for s in bitmask.SUFFIXES:
            t.pop(f"{Q}.{s}")
        t[f"{Q}.weight"] = torch.ones(32, 32, dtype=torch.bfloat16)
    _rewrite(d, densify)
    _refused(d, rf"config.json says '{Q}' is 2:4 .* but its weight '{Q}.weight' has groups of 4 inputs with more")


def test_dense_24_weight_of_a_target_is_accepted(tmp_path):
    d = _copy(tmp_path)
    expected = load_file(str(FIX / "expected" / "llama_bf16.safetensors"))

    def densify(t):
        for s in bitmask.SUFFIXES:
            t.pop(f"{Q}.{s}")
        t[f"{Q}.weight"] = expected[f"{Q}.weight"]
    _rewrite(d, densify)
    assert torch.equal(_load_quiet(d).state_dict()[f"{Q}.weight"], expected[f"{Q}.weight"])


def test_unexpected_and_missing_tensors(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    _refused(d, r"holds tensor 'model.extra.weight' \(1 in all\), which LlamaForCausalLM has no place for")
    d = _copy(tmp_path / "b")
    _rewrite(d, lambda t: t.pop("model.norm.weight"))
    _refused(d, r"tensor 'model.norm.weight' of LlamaForCausalLM is missing from the folder")


def test_missing_shard_and_lying_index(tmp_path):
    d = _copy(tmp_path, "llama_fp8_tensor")
    (d / "model-00002-of-00002.safetensors").unlink()
    _refused(d, r"index.json: names shard 'model-00002-of-00002.safetensors' .*which is not in the folder")
    d = _copy(tmp_path / "b", "llama_fp8_tensor")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    _refused(d, r"model-00001-of-00002.safetensors: lacks tensor 'model.norm.weight', which the index places there")


def test_truncated_file(tmp_path):
    d = _copy(tmp_path)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    _refused(d, r"model.safetensors: is truncated")


def test_unsupported_schemes(tmp_path):
    d = _copy(tmp_path, "llama_fp8_channel")

    def int4(cfg):
        g = cfg["quantization_config"]["config_groups"]["group_0"]
        g["format"] = "pack-quantized"
        g["weights"].update(num_bits=4, type="int", strategy="group", group_size=128)
    _config(d, int4)
    _refused(d, r"quantization scheme of group 'group_0' \(format 'pack-quantized', weights int4 group static, "
                r"group 128\) is not supported")
    d = _copy(tmp_path / "b", "llama_fp8_channel")
    _config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="block"))
    _refused(d, r"FP8 weights float8 block static\) is not supported")
    d = _copy(tmp_path / "c")
    _config(d, lambda c: c["quantization_config"]["sparsity_config"].update(format="sparse-bitmask"))
    _refused(d, r"sparsity_config format is 'sparse-bitmask': nmsparse reads 'sparse-24-bitmask'")
    d = _copy(tmp_path / "d")
    _config(d, lambda c: c.pop("quantization_config"))
    _refused(d, r"no compressed-tensors 'quantization_config'")
    d = _copy(tmp_path / "e", "llama_fp8_channel")
    _config(d, lambda c: c["quantization_config"].update(config_groups={}))
    _refused(d, r"'model.layers.0.mlp.down_proj.compressed' holds FP8 values, but no quantization group")


def test_fp8_scale_of_the_wrong_shape(tmp_path):
    d = _copy(tmp_path, "llama_fp8_channel")
    _rewrite(d, lambda t: t.__setitem__(f"{Q}.weight_scale", torch.ones(1, dtype=torch.bfloat16)))
    _refused(d, rf"tensor '{Q}.weight_scale' is shape \(1,\); FP8 channel scales of '{Q}' need shape \(32, 1\)")


def test_wrong_model_class_names_the_recorded_one(tmp_path):
    """A BertModel folder loaded with the default AutoModelForCausalLM: the error names the class to pass."""
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=16)
    model = transformers.BertModel(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(nm_mask(mod.weight, 2, 4, dim=1))
    save(model, tmp_path / "bert")
    _refused(tmp_path / "bert", r"records architectures \['BertModel'\]: pass model_class=transformers.BertModel\)$")
    back = _load_quiet(tmp_path / "bert", model_class=transformers.BertModel)
    assert torch.equal(back.pooler.dense.weight, model.pooler.dense.weight)


def test_not_a_folder(tmp_path):
    _refused(tmp_path, r"has no config.json")
    _refused(tmp_path / "nope", r"nope: not found$")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    _refused(tmp_path / "model.safetensors", r"is a file: give the model folder")
    d = _copy(tmp_path / "b")
    (d / "model.safetensors").unlink()
    _refused(d, r"holds no model.safetensors")


def test_overwrite_removes_stale_shards(tmp_path):
    model = _tiny()
    save(model, tmp_path / "o", max_shard_bytes=20_000)
    save(model, tmp_path / "o", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(_load_quiet(tmp_path / "o").lm_head.weight, model.lm_head.weight)


def test_export_cli_compressed_tensors(tmp_path, capsys):
    from nmsparse.cli.dispatch import main

    model = _tiny()
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ct"
    assert main(["export", "--hf-model", str(tmp_path / "hf"), "--format", "compressed-tensors", "--dtype", "bf16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lm_head: dense (not 2:4" in printed and "12 Linear layer(s) stored 2:4" in printed
    back = _load_quiet(out)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert json.loads((out / "export_report.json").read_text())["nm"] == "2:4"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "final.safetensors"))
    for argv, msg, dst in [
        (["--dtype", "fp32"], "stores bf16 or fp16 weights", "y"),
        (["--dtype", "bf16", "--nm", "4:8"], "is 2:4 along the input features", "y"),
        (["--dtype", "bf16"], "already holds an export; pass --overwrite", "ct"),
        (["--dtype", "bf16"], "is not empty; pass --overwrite", "busy"),  # was save()'s 'overwrite=True'
        (["--dtype", "bf16"], "final.safetensors/sub: a part of the path is not a folder",
         "final.safetensors/sub"),  # an OSError: was a traceback
    ]:
        assert main(["export", "--hf-model", str(tmp_path / "hf"), "--format", "compressed-tensors",
                     "--out", str(tmp_path / dst), *argv]) == 2
        err = capsys.readouterr().err  # transformers' 'Loading weights' bar may come first
        last = err.strip().splitlines()[-1]
        assert last.startswith("nmsparse export: error: ") and msg in last and "Traceback" not in err, err
    assert not (tmp_path / "y").exists() and [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    assert main(["export", "--checkpoint", str(tmp_path / "final.safetensors"), "--format", "compressed-tensors",
                 "--dtype", "bf16", "--out", str(tmp_path / "x")]) == 2
    assert "pass --hf-model" in capsys.readouterr().err


def test_export_cli_reads_a_compressed_tensors_folder(tmp_path, capsys):
    """--hf-model naming a stranded sparse-24-bitmask folder: decompressed by nmsparse (transformers'
    from_pretrained asked for a compressed-tensors release that no longer reads the format)."""
    from nmsparse.cli.dispatch import main

    assert main(["export", "--hf-model", str(FIX / "llama_fp8_tensor"), "--format", "dense", "--dtype", "bf16",
                 "--out", str(tmp_path / "d")]) == 0
    out, err = capsys.readouterr()
    assert "note: " in err and "FP8 weights of 14 layer(s) dequantized" in err
    want = _load_quiet(FIX / "llama_fp8_tensor").state_dict()
    got = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert set(got) <= set(want) and len(got) >= 20
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())


def test_skeleton_on_meta_and_shards_read_in_order(monkeypatch):
    from nmsparse.integrations.compressed_tensors import read as rd

    built, reads = [], []
    real_build, real_read = rd.build_model, rd.read_tensor

    def build(cls, config):
        model = real_build(cls, config)
        built.append((config.num_hidden_layers, {p.device.type for p in model.parameters()}))
        return model

    def read(entry, name):
        reads.append((entry.file.name, name))
        return real_read(entry, name)

    monkeypatch.setattr(rd, "build_model", build)
    monkeypatch.setattr(rd, "read_tensor", read)
    model = _load_quiet(FIX / "llama_fp8_tensor")
    assert built[0] == (2, {"meta"})  # the whole model: a skeleton without memory
    assert len(built) == 1  # the rotary buffers come from a rotary module built alone
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    main = [f for f, n in reads if not n.rsplit(".", 1)[1] in ("bitmask", "shape", "weight_scale")]
    assert main == sorted(main) and len(set(main)) == 2  # shard 1, then shard 2


@pytest.mark.parametrize("rows,cols", [(1, 4), (3, 12), (5, 36), (2, 64)])
def test_pack_matches_numpy_for_any_width(rows, cols):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = bitmask.pack_rows(mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(bitmask.unpack_rows(packed, cols), mask)


def test_buffers_from_a_shell_when_their_module_cannot_be_built_alone(monkeypatch):
    from nmsparse.integrations.compressed_tensors import read as rd

    built = []
    real_build = rd.build_model
    monkeypatch.setattr(rd, "_rebuilt", lambda mod, config: None)
    monkeypatch.setattr(rd, "build_model", lambda cls, config: built.append(config.num_hidden_layers)
                        or real_build(cls, config))
    model = _load_quiet(FIX / "llama_bf16")
    assert built == [2, 0]  # skeleton, then a block-less shell on the CPU
    monkeypatch.undo()
    reference = _load_quiet(FIX / "llama_bf16")
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("rows,cols", [(1, 4), (3, 12), (7, 36), (33, 64)])
def test_decompress_kernel_matches_a_boolean_index_reference(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    keep = torch.zeros(rows * cols // 4, 4, dtype=torch.bool)
    keep.scatter_(1, torch.rand(rows * cols // 4, 4, generator=g).topk(2, dim=1).indices, True)
    keep = keep.reshape(rows, cols)
    values = torch.randn(rows, cols // 2, generator=g).to(dtype)
    packed = bitmask.pack_rows(keep)
    reference = torch.zeros(rows, cols, dtype=dtype)
    reference.view(torch.uint8 if dtype == torch.float8_e4m3fn else dtype)[keep] = \
        values.reshape(-1).view(torch.uint8 if dtype == torch.float8_e4m3fn else dtype)
    got = bitmask.decompress24(values, packed, torch.tensor([[rows], [cols]]), "w")
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), reference.view(torch.uint8))
    if cols % 8 == 4:  # padding bits of the last byte are ignored, as compressed-tensors does
        packed[:, -1] |= 0xF0
        assert torch.equal(bitmask.decompress24(values, packed, torch.tensor([[rows], [cols]]), "w").view(torch.uint8),
                           reference.view(torch.uint8))


def test_our_files_carry_a_checksum_that_load_and_inspect_verify(tmp_path):
    from nmsparse import inspect
    from nmsparse.plumbing.checksum import KEY

    save(_tiny(), tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert KEY in f.metadata()
        name = next(k for k in f.keys() if k.endswith(".compressed"))
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    offsets = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
    raw[8 + header_len + offsets[0]] ^= 0x10  # one bit of one stored value
    path.write_bytes(bytes(raw))
    _refused(tmp_path / "out", f"checksum: tensor '{name}'")
    with pytest.raises(LoadError, match="checksum"):
        inspect(tmp_path / "out")


def test_a_killed_save_leaves_nothing_beside_the_folder(tmp_path, monkeypatch):
    import nmsparse.integrations.compressed_tensors.write as write

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "save_safetensors", full)
    with pytest.raises(OSError, match=r"cannot write .*out.*: no space left") as e:
        save(_tiny(), tmp_path / "out")
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # the new folder removed again, no temp folder beside it
