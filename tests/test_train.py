"""TrainConfig, the training loop's outputs and the ``nmsparse train`` command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nmsparse
from nmsparse.cli.dispatch import main
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.config import TrainConfig, parse_nm, sparsify_supports_transposable
from nmsparse.training.loop import Trainer, train, warmup_cosine
from nmsparse.training.models import build_model

SMALL = dict(data="digits", epochs=1, batch_size=64, lr=0.05, train_subset=256, test_subset=100, threads=1)


# --- TrainConfig -----------------------------------------------------------------------------

def test_config_defaults_follow_the_papers():
    c = TrainConfig()
    assert (c.model, c.data, c.data_dir, c.nm, c.method, c.decay, c.layout) == (
        "resnet", "fashion-mnist", None, "2:4", "srste", 2e-4, "channels")
    assert (c.transposable, c.mask_method, c.update_every) == (False, "approx", 1)
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.warmup_epochs) == ("sgd", 0.1, 0.9, 5e-5, 1)
    assert (c.epochs, c.batch_size, c.seed, c.threads, c.train_subset, c.test_subset, c.sad_nm, c.out) == (
        30, 128, 0, None, None, None, None, "runs/x")


def test_config_round_trip():
    c = TrainConfig(nm="dense", sad_nm="4:8", optimizer="adamw", threads=2, train_subset=10)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict(dict(d, bogus=1))


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm("dense") is None and parse_nm("1:16") == (1, 16)
    for bad in ("5:4", "4:4", "0:4", "2", "a:b", "2:4:8", ""):
        with pytest.raises(ValueError):
            parse_nm(bad)
    assert TrainConfig(nm="dense").sad_pair == (2, 4)
    assert TrainConfig(nm="dense", sad_nm="1:8").sad_pair == (1, 8)
    assert TrainConfig(nm="4:8").sad_pair == (4, 8)


@pytest.mark.parametrize("field,value,message", [
    ("nm", "5:4", "need 0 < N < M"),
    ("nm", "half", "nm must look like N:M"),
    ("model", "vgg", "unknown model 'vgg'"),
    ("data", "mnist", "unknown data 'mnist'"),
    ("method", "magic", "unknown method"),
    ("layout", "rows", "unknown layout"),
    ("mask_method", "exact", "unknown mask_method"),
    ("optimizer", "adam", "unknown optimizer"),
    ("decay", float("nan"), "decay"),
    ("update_every", 0, "update_every"),
    ("lr", 0.0, "lr must be a positive"),
    ("momentum", 1.0, "momentum"),
    ("weight_decay", -1.0, "weight_decay"),
    ("epochs", 0, "epochs"),
    ("warmup_epochs", 31, "warmup_epochs"),
    ("batch_size", 0, "batch_size"),
    ("seed", -1, "seed"),
    ("threads", 0, "threads"),
    ("train_subset", 0, "train_subset"),
    ("sad_nm", "2:4", "sad_nm only applies to dense runs"),
    ("device", "tpu", "device"),
    ("out", "", "out must be"),
])
def test_validate_rejects(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validate(check_out=False)


def test_validate_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        TrainConfig(out=str(f)).validate()
    with pytest.raises(ValueError, match="is not a folder"):
        TrainConfig(out=str(f / "sub" / "run")).validate()
    TrainConfig(out=str(tmp_path / "a" / "b")).validate()
    assert not (tmp_path / "a").exists()  # validating creates nothing


def test_validate_transposable():
    c = TrainConfig(transposable=True, nm="dense")
    with pytest.raises(ValueError, match="transposable masks need an N:M run"):
        c.validate(check_out=False)
    c = TrainConfig(transposable=True)
    if sparsify_supports_transposable():
        c.validate(check_out=False)
    else:
        with pytest.raises(ValueError, match="transposable masks are not available"):
            c.validate(check_out=False)


# --- schedule --------------------------------------------------------------------------------

def test_warmup_then_cosine():
    f = warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.5)
    assert f(13) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert f(14) == pytest.approx(0.0)
    g = warmup_cosine(0, 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)


# --- the loop --------------------------------------------------------------------------------

def test_sparse_run_outputs(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(model="resnet", nm="2:4", out=str(out), **dict(SMALL, epochs=2))
    trainer = Trainer(cfg, progress=False, log=None)
    records = trainer.run()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "final.safetensors",
                                                     "metrics.jsonl"]
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "loss", "train_acc", "test_acc", "lr", "time", "sad"} <= set(r)
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["time"] > 0
        assert set(r["sad"]) == {"total", "layers"}
        assert {"size", "vs_initial", "vs_previous", "vs_initial_frac", "vs_previous_frac"} <= set(r["sad"]["total"])
        assert set(r["sad"]["layers"]) == set(nmsparse.masks(trainer.model))
    assert records[0]["sad"]["total"]["vs_initial"] == records[0]["sad"]["total"]["vs_previous"]
    assert records[-1]["lr"] < records[0]["lr"]  # the cosine decays

    state = ckpt.load(out / "checkpoint.pt")  # weights_only=True
    assert state["epoch"] == 2 and state["records"] == records
    assert any(k.endswith("parametrizations.weight.0.mask") for k in state["model"])

    # the finalized weights load into a fresh architecture and reproduce the sparse model
    final = load_file(out / "final.safetensors")
    fresh = build_model("resnet", image_size=8)
    fresh.load_state_dict(final)
    x = trainer.data.x_test[:16]
    trainer.model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trainer.model(x))
    for name, mask in nmsparse.masks(trainer.model).items():
        assert torch.equal(final[name] != 0, mask & (final[name] != 0))
        assert nmsparse.layer_is_nm(final[name], 2, 4)


def test_dense_run_tracks_magnitude_sad(tmp_path):
    cfg = TrainConfig(model="mlp", nm="dense", sad_nm="1:4", out=str(tmp_path / "d"), **SMALL)
    records = train(cfg, progress=False, log=None)
    sad = records[0]["sad"]
    assert set(sad["layers"]) == {"net.3.weight"} and sad["total"]["size"] == 256 * 256
    assert sad["total"]["vs_initial"] > 0
    final = load_file(tmp_path / "d" / "final.safetensors")
    assert (final["net.3.weight"] != 0).float().mean() > 0.99  # dense stays dense


def test_adamw_and_flat_layout(tmp_path):
    cfg = TrainConfig(model="vit", nm="4:8", method="ste", layout="flat", optimizer="adamw",
                      weight_decay=0.01, update_every=3, out=str(tmp_path / "v"), **dict(SMALL, lr=1e-3))
    records = train(cfg, progress=False, log=None)
    assert math.isfinite(records[0]["loss"])


def test_fixed_method_keeps_its_mask(tmp_path):
    cfg = TrainConfig(model="mlp", method="fixed", out=str(tmp_path / "f"), **SMALL)
    records = train(cfg, progress=False, log=None)
    assert records[0]["sad"]["total"]["vs_initial"] == 0


def test_srste_decay_lowers_sad(tmp_path):
    """SR-STE's decay of pruned weights stabilises the mask: SAD(srste) < SAD(ste) on the same run."""
    sads = {}
    for method in ("ste", "srste"):
        cfg = TrainConfig(model="mlp", method=method, decay=2e-2, out=str(tmp_path / method),
                          **dict(SMALL, epochs=2, train_subset=512))
        sads[method] = train(cfg, progress=False, log=None)[-1]["sad"]["total"]["vs_initial"]
    assert sads["srste"] < sads["ste"]


def test_progress_and_summary_lines(tmp_path, capsys):
    lines = []
    train(TrainConfig(model="mlp", out=str(tmp_path / "p"), **SMALL), progress="bar", log=lines.append)
    assert lines[0].startswith("epoch   1/1  loss ") and "test " in lines[0] and "SAD " in lines[0]
    assert lines[-1].startswith("done: test accuracy")
    assert "epoch 1/1" in capsys.readouterr().err  # the tqdm bar
    # stderr is not a terminal here: auto means plain lines, and the summary line is the epoch's line
    train(TrainConfig(model="mlp", out=str(tmp_path / "p"), **SMALL), progress=True, log=lines.append)
    assert capsys.readouterr().err == ""


# --- the CLI ---------------------------------------------------------------------------------

def _cli_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
            "--train-subset", "256", "--threads", "1", "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize("extra,message", [
    (["--nm", "5:4"], "need 0 < N < M"),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--method", "x"], "unknown method"),
    (["--optimizer", "sgdm"], "unknown optimizer"),
    (["--transposable", "--nm", "dense"], "transposable masks need"),
])
def test_cli_invalid_arguments(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(_cli_args(out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("nmsparse train: error: ")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(_cli_args(blocker / "run")) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_bad_type_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_cli_args(tmp_path / "run", "--epochs", "two"))
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_data(tmp_path, capsys):
    args = _cli_args(tmp_path / "run")
    args[args.index("digits")] = "fashion-mnist"
    assert main(args + ["--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "apt-get install" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_args(out, "--nm", "dense")) == 0
    stdout = capsys.readouterr().out
    assert "epoch   1/1" in stdout and "done: test accuracy" in stdout
    assert json.loads((out / "config.json").read_text())["nm"] == "dense"
    assert main(_cli_args(out, "--nm", "dense")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(_cli_args(out, "--nm", "dense", "--resume")) == 0  # finished: nothing more to train
    assert main(_cli_args(out, "--nm", "2:4", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["nm"] == "2:4"
    assert main(_cli_args(out, "--nm", "1:4", "--resume")) == 2  # other settings than the checkpoint
    assert "other settings" in capsys.readouterr().err


def test_cli_help_documents_every_knob(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--data-dir", "--nm", "--method", "--decay", "--layout", "--transposable",
                 "--mask-method", "--update-every", "--optimizer", "--lr", "--momentum", "--weight-decay",
                 "--warmup-epochs", "--epochs", "--batch-size", "--seed", "--threads", "--train-subset",
                 "--test-subset", "--sad-nm", "--out", "--resume"):
        assert flag in text


def test_threads_setting_survives_the_mask_kernel(tmp_path):
    """numba's OpenMP pool must not reset torch's thread count once training has set it."""
    before = torch.get_num_threads()
    try:
        from nmsparse.training.loop import configure_threads

        configure_threads(1)
        nmsparse.nm_mask(torch.randn(64, 1024), 2, 4)  # large enough for the numba kernel
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cli_out_that_passes_the_precheck_but_cannot_be_created(tmp_path, capsys, monkeypatch):
    """An OSError when the folder is finally made (root under /proc, a race) is still one line, exit 2."""
    real_mkdir = Path.mkdir

    def failing_mkdir(self, *args, **kwargs):
        if self.name == "cannot":
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    out = tmp_path / "cannot"
    rc = main(["train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cannot create the output folder" in err and "Permission denied" in err
    assert not out.exists()
