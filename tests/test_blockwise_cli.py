"""``nmsparse prune --hf-model``: block-wise pruning of a transformers folder from the command line, with a
word-level tokenizer built offline and saved next to a tiny random LLaMA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import nmsparse  # noqa: E402
from nmsparse.cli.dispatch import main  # noqa: E402

WORDS = ("the a of to and in is it that for on with as was at by be this from or an are not have but "
         "file return value list string number error open read write close name data type call run").split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hf")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    g = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3000,), generator=g))
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(text[::-1])
    (tmp_path / "short.txt").write_text("the file of the list")
    return tmp_path


def _run(*args):
    return subprocess.run([sys.executable, "-m", "nmsparse", "prune", *args], capture_output=True, text=True)


def test_cli_prunes_streams_and_scores(folder, tmp_path):
    src = folder / "llama"
    out = tmp_path / "out"
    res = _run("--hf-model", str(src), "--calib-text", str(folder / "calib.txt"), "--calib-samples", "8",
               "--seqlen", "32", "--nm", "2:4", "--method", "sparsegpt", "--eval-perplexity",
               str(folder / "eval.txt"), "--eval-windows", "4", "--out", str(out), "--no-progress",
               "--block-log", str(tmp_path / "blocks.jsonl"))
    assert res.returncode == 0, res.stderr
    logged = [json.loads(line) for line in (tmp_path / "blocks.jsonl").read_text().splitlines()]
    assert [b["block"] for b in logged] == [0, 1] and all(b["peak_rss_bytes"] > 0 < b["cpu_s"] for b in logged)
    assert logged[0]["memory"]["rss_after_shell_load_bytes"] > 0
    report = json.loads((out / "prune_report.json").read_text())
    s = report["summary"]
    assert s["calib_samples"] == 8 and s["pruned_perplexity"]["windows"] == 4
    assert s["pruned_perplexity"]["perplexity"] > 1 and s["dense_perplexity"]["perplexity"] > 1
    assert "perplexity (4 windows of 32)" in res.stdout
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "0.self_attn.q_proj":  # first layer: keep_dense
            assert nmsparse.layer_is_nm(mod.weight, 2, 4), name
    assert (out / "tokenizer.json").is_file()
    # again into the same folder: refused without --overwrite, replaced with it
    args = ["prune", "--hf-model", str(src), "--calib-text", str(folder / "calib.txt"), "--calib-samples", "4",
            "--seqlen", "32", "--method", "magnitude", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "prune_report.json").read_text())["summary"]["method"] == "magnitude"
    assert not (tmp_path / ".out.new").exists()


@pytest.mark.parametrize("extra,message", [
    ([], "needs --calib-text FILE"),
    (["--calib-text", "CALIB", "--recalibrate-bn"], "--recalibrate-bn: only for models from 'nmsparse train'"),
    (["--calib-text", "CALIB", "--checkpoint", "x.safetensors"], "--checkpoint: only for models from"),
    (["--calib-text", "CALIB", "--permute"], "--permute: only for models from"),
    (["--calib-text", "CALIB", "--seqlen", "1"], "--seqlen must be a positive integer"),
    (["--calib-text", "CALIB", "--dtype", "fp8"], "unknown --dtype 'fp8'"),
    (["--calib-text", "CALIB", "--seqlen", "60000"], "longer than the model's max_position_embeddings (64)"),
    (["--calib-text", "SHORT", "--seqlen", "32"], "not more than --seqlen 32"),
    (["--calib-text", "CALIB", "--eval-perplexity", "missing.txt"], "--eval-perplexity missing.txt is not a file"),
    (["--calib-text", "CALIB", "--seqlen", "32", "--tokenizer", "NOWHERE"], "no tokenizer in"),
    (["--calib-text", "CALIB", "--blocks", "0"], "--blocks must be a positive integer"),
    (["--calib-text", "CALIB", "--seqlen", "32", "--blocks", "3"], "blocks must be an integer from 1 to the model's 2"),
])
def test_cli_errors(folder, tmp_path, capsys, extra, message):
    names = {"CALIB": folder / "calib.txt", "SHORT": folder / "short.txt", "NOWHERE": tmp_path / "nowhere"}
    extra = [str(names.get(a, a)) for a in extra]
    assert main(["prune", "--hf-model", str(folder / "llama"), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_never_replaces_its_source(folder, capsys):
    src = folder / "llama"
    for out in (src, folder):
        args = ["prune", "--hf-model", str(src), "--calib-text", str(folder / "calib.txt"), "--out", str(out),
                "--overwrite"]
        assert main(args) == 2
        assert "would replace the --hf-model folder itself" in capsys.readouterr().err
    assert (src / "config.json").is_file()


def test_cli_needs_a_source(tmp_path, capsys):
    assert main(["prune", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pass --checkpoint" in err and "--hf-model" in err
    assert main(["prune", "--hf-model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is not a save_pretrained folder" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", "x.safetensors", "--blocks", "1", "--out", str(tmp_path / "out")]) == 2
    assert "--blocks is for --hf-model folders" in capsys.readouterr().err
