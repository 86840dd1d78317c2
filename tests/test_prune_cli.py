"""``nmsparse prune``: a checkpoint in, the outputs of ``nmsparse train`` plus a pruning report out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmsparse.plumbing.checksum import sign
from nmsparse.cli.dispatch import main
from nmsparse.masking.layout import layer_is_nm
from nmsparse.cli.prune import balanced_indices

training = pytest.importorskip("nmsparse.training.models")


def _checkpoint(tmp_path, model_name="mlp", **config):
    torch.manual_seed(0)
    model = training.build_model(model_name, image_size=8, in_channels=1, num_classes=10)
    path = tmp_path / "final.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"model": model_name, "data": "digits", **config}
    save_file(tensors, str(path), metadata=sign(tensors, {"config": json.dumps(meta)}))  # as 'nmsparse train' writes it
    return path


@pytest.mark.parametrize("method", ["magnitude", "adaprune"])
def test_prune_cli_writes_train_outputs_and_report(tmp_path, method, capsys):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "pruned"
    rc = main(["prune", "--checkpoint", str(ckpt), "--nm", "2:4", "--method", method, "--calib-samples", "20",
               "--out", str(out), "--no-progress", "--test-subset", "100"])
    assert rc == 0
    for f in ("config.json", "metrics.jsonl", "final.safetensors", "prune_report.json", "prune_report.txt"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["summary"]["calib_samples"] == 20 and rep["report"]["settings"]["method"] == method
    w = load_file(str(out / "final.safetensors"))
    sparse = [e for e in rep["report"]["layers"] if e["sparse"]]
    assert sparse
    for e in sparse:
        assert layer_is_nm(w[e["param"]], 2, 4)
    assert "test accuracy" in capsys.readouterr().out


def test_prune_cli_finetune(tmp_path):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "ft"
    rc = main(["prune", "--checkpoint", str(ckpt), "--nm", "2:4", "--method", "sparsegpt", "--calib-samples", "10",
               "--out", str(out), "--no-progress", "--finetune-epochs", "1", "--train-subset", "128",
               "--test-subset", "50"])
    assert rc == 0
    for f in ("config.json", "metrics.jsonl", "checkpoint.pt", "final.safetensors", "prune_report.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["summary"]["finetuned"] is not None
    pruned = {e["param"] for e in rep["report"]["layers"] if e["sparse"]}
    w = load_file(str(out / "final.safetensors"))
    for k in pruned:
        assert layer_is_nm(w[k], 2, 4), k


@pytest.mark.parametrize("flags, source, expect", [
    ([], {}, ("sgd", 0.01)),
    ([], {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05}, ("adamw", 2e-4)),
    (["--finetune-optimizer", "sgd", "--finetune-lr", "0.03"], {"optimizer": "adamw", "lr": 1e-3}, ("sgd", 0.03)),
])
def test_prune_cli_finetune_follows_the_source_recipe(tmp_path, flags, source, expect):
    ckpt = _checkpoint(tmp_path, **source)
    out = tmp_path / "ft"
    rc = main(["prune", "--checkpoint", str(ckpt), "--nm", "2:4", "--method", "magnitude", "--calib-samples", "10",
               "--out", str(out), "--no-progress", "--finetune-epochs", "1", "--train-subset", "64",
               "--test-subset", "20", *flags])
    assert rc == 0
    recipe = json.loads((out / "prune_report.json").read_text())["summary"]["finetune_recipe"]
    assert (recipe["optimizer"], recipe["lr"]) == pytest.approx(expect)
    trained = json.loads((out / "config.json").read_text())
    assert trained["optimizer"] == expect[0] and trained["lr"] == pytest.approx(expect[1])
    if "weight_decay" in source:
        assert trained["weight_decay"] == source["weight_decay"]


def test_prune_cli_bad_finetune_optimizer(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    rc = main(["prune", "--checkpoint", str(ckpt), "--method", "magnitude", "--calib-samples", "10", "--out",
               str(tmp_path / "o"), "--no-progress", "--finetune-epochs", "1", "--finetune-optimizer", "lion",
               "--test-subset", "20"])
    assert rc == 2
    assert "--finetune-optimizer 'lion': not one of sgd, adamw" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is pruned or written


def test_prune_cli_bad_recipe_in_checkpoint_is_named_and_overridable(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, optimizer="lion", lr="1e-3")
    args = ["prune", "--checkpoint", str(ckpt), "--method", "magnitude", "--calib-samples", "10", "--no-progress",
            "--finetune-epochs", "1", "--train-subset", "64", "--test-subset", "20"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "the checkpoint records optimizer 'lion'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # another optimizer inherits nothing from the run, so the recorded (bad) lr no longer matters
    assert main(args + ["--out", str(tmp_path / "b"), "--finetune-optimizer", "sgd"]) == 0
    recipe = json.loads((tmp_path / "b" / "prune_report.json").read_text())["summary"]["finetune_recipe"]
    assert recipe == {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-5, "momentum": 0.9}


def test_prune_cli_finetune_flags_need_finetune_epochs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    rc = main(["prune", "--checkpoint", str(ckpt), "--finetune-lr", "0.1", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--finetune-lr set the fine-tuning; pass --finetune-epochs K too" in capsys.readouterr().err


def test_prune_cli_bn_samples(tmp_path, capsys):
    from nmsparse.pruning import recalibrate_batchnorm
    from nmsparse.training.data import load_dataset

    ckpt = _checkpoint(tmp_path, "resnet")
    out = tmp_path / "bn"
    rc = main(["prune", "--checkpoint", str(ckpt), "--method", "magnitude", "--calib-samples", "10",
               "--recalibrate-bn", "--bn-samples", "60", "--out", str(out), "--no-progress", "--test-subset", "20"])
    assert rc == 0
    assert json.loads((out / "prune_report.json").read_text())["summary"]["bn_samples"] == 60
    # the written statistics are those of the 60 balanced images, not of the 10 calibration images
    w = load_file(str(out / "final.safetensors"))
    model = training.build_model("resnet", image_size=8, in_channels=1, num_classes=10)
    model.load_state_dict(w)
    data = load_dataset("digits")
    recalibrate_batchnorm(model, [data.x_train[balanced_indices(data.y_train, 60, 0)]])
    assert torch.allclose(model.bn1.running_mean, w["bn1.running_mean"], atol=1e-6)
    recalibrate_batchnorm(model, [data.x_train[balanced_indices(data.y_train, 10, 0)]])
    assert not torch.allclose(model.bn1.running_mean, w["bn1.running_mean"], atol=1e-6)

    rc = main(["prune", "--checkpoint", str(ckpt), "--method", "magnitude", "--calib-samples", "10",
               "--recalibrate-bn", "--out", str(tmp_path / "bn10"), "--no-progress", "--test-subset", "20"])
    assert rc == 0
    assert json.loads((tmp_path / "bn10" / "prune_report.json").read_text())["summary"]["bn_samples"] == 10

    (tmp_path / "m").mkdir()
    mlp = _checkpoint(tmp_path / "m")
    rc = main(["prune", "--checkpoint", str(mlp), "--method", "magnitude", "--calib-samples", "10",
               "--recalibrate-bn", "--out", str(tmp_path / "mlp"), "--no-progress", "--test-subset", "20"])
    assert rc == 0 and "has no batch-norm layers" in capsys.readouterr().out

    assert main(["prune", "--checkpoint", str(ckpt), "--bn-samples", "50", "--out", str(tmp_path / "x")]) == 2
    assert main(["prune", "--checkpoint", str(ckpt), "--recalibrate-bn", "--bn-samples", "0",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "pass --recalibrate-bn too" in err and "--bn-samples must be a positive integer" in err
    assert not (tmp_path / "x").exists()


def test_prune_cli_errors(tmp_path, capsys):
    assert main(["prune", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    ckpt = _checkpoint(tmp_path)
    assert main(["prune", "--checkpoint", str(ckpt), "--method", "obs", "--out", str(tmp_path / "o")]) == 2
    assert main(["prune", "--checkpoint", str(ckpt), "--nm", "4:4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown --method" in err and "--nm" in err


def test_balanced_calibration_draw():
    labels = torch.arange(10).repeat_interleave(30)
    idx = balanced_indices(labels, 25, seed=0)
    counts = torch.bincount(labels[idx], minlength=10)
    assert len(idx) == 25 and counts.max() - counts.min() <= 1
    assert torch.equal(idx, balanced_indices(labels, 25, seed=0))
