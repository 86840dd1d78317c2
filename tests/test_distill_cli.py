"""``nmsparse distill`` on a tiny random BERT saved with save_pretrained (no weights downloaded)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import nmsparse
from nmsparse.cli.dispatch import main
from nmsparse.masking.layout import layer_is_nm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "file", "open", "read", "write", "return", "value", "list", "string", "number", "error"]


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_cli")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = transformers.BertTokenizer(str(vocab))
    dense = tiny_bert()
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    pruned = copy.deepcopy(dense)
    nmsparse.prune(pruned, 2, 4, method="magnitude", include="encoder.*", keep_dense=(), progress=False)
    pruned.save_pretrained(root / "pruned")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
             for k in torch.randint(3, 12, (40,), generator=g)]
    (root / "text.txt").write_text("\n".join(lines) + "\n\n")
    return root


def _args(root, out, *extra):
    return ["distill", "--student", str(root / "pruned"), "--teacher", str(root / "dense"), "--text",
            str(root / "text.txt"), "--nm", "2:4", "--include", "encoder.*", "--steps", "6", "--batch-size", "8",
            "--out", str(out), "--no-progress", *extra]


def test_distill_writes_a_loadable_2_4_model_and_resumes(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(folders, out)) == 0
    assert "distilled 12 N:M layers for 6 steps" in capsys.readouterr().out
    model = transformers.AutoModel.from_pretrained(out / "model", local_files_only=True)
    linears = [(k, v) for k, v in model.named_modules() if isinstance(v, torch.nn.Linear) and k.startswith("encoder.")]
    assert len(linears) == 12 and all(layer_is_nm(v.weight, 2, 4) for _, v in linears)
    pruned = transformers.AutoModel.from_pretrained(folders / "pruned", local_files_only=True)
    before = dict(pruned.named_modules())
    for k, v in linears:  # fixed masks: the pruned support, new values
        assert torch.equal(v.weight != 0, before[k].weight != 0), k
    assert not all(torch.equal(v.weight, before[k].weight) for k, v in linears)
    assert transformers.AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "final.safetensors"):
        assert (out / name).is_file()
    assert main(_args(folders, out, "--resume")) == 0  # finished: finalizes again from the checkpoint
    again = transformers.AutoModel.from_pretrained(out / "model", local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("change,message", [
    (lambda a, r: a.__setitem__(a.index("--nm") + 1, "dense"), "--nm dense: the student must be N:M"),
    (lambda a, r: a.__setitem__(a.index("--nm") + 1, "4:2"), "need 0 < N < M"),
    (lambda a, r: a.__setitem__(a.index("--steps") + 1, "0"), "--steps must be a positive integer"),
    (lambda a, r: a.__setitem__(a.index("--text") + 1, str(r / "none.txt")), "cannot read --text"),
    (lambda a, r: a.__setitem__(a.index("--teacher") + 1, str(r)), "is not a save_pretrained folder"),
    (lambda a, r: (a.remove("--nm"), a.remove("2:4")), "pass --nm N:M"),
])
def test_bad_input_is_one_line_exit_2(folders, tmp_path, capsys, change, message):
    args = _args(folders, tmp_path / "x")
    change(args, folders)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x" / "model").exists()


def test_a_run_folder_is_not_replaced_without_a_flag(folders, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(_args(folders, out)) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = _args(folders, tmp_path / "y")
    args[args.index("--text") + 1] = str(empty)
    assert main(args) == 2
    assert "holds no text" in capsys.readouterr().err
