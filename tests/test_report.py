"""report.md and its plots from a grid trained by a fake trainer: numbers, statuses, figures, CLI."""

from __future__ import annotations

import json
import math

import pytest

import nmsparse.reproduce.runner as R
from nmsparse.cli.dispatch import main as cli_main
from nmsparse.reproduce import grid as G
from nmsparse.reproduce.report import write_report
from nmsparse.reproduce.results import mean_std
from test_reproduce_fakes import FakeConfig, FakeTrain, Killed

SCALE = G.Scale(epochs=3, seeds=(0, 1, 2), train_subset=100, test_subset=50, nms=("2:4", "1:8"))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    exps = list(G.EXPERIMENTS)
    R.run_grid(G.build_grid(exps, SCALE), SCALE, out, experiments=exps, train_fn=FakeTrain(),
               make_config=FakeConfig.from_dict, log=lambda s: None, command="nmsparse reproduce --test")
    return out


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    mu, sd, n = mean_std([])
    assert math.isnan(mu) and n == 0


def test_report_tables_and_plots(grid_dir, tmp_path):
    path = write_report(grid_dir, tmp_path / "rep")
    text = path.read_text()
    # SR-STE 2:4 top-1 per seed: 0.88 - 0.2/3 + 0.01*seed -> mean 82.33, std 1.00
    acc = 100 * (0.88 - 0.2 / 3 + 0.01)
    assert f"| ResNet | 2:4 | {100 * (0.9 - 0.2 / 3 + 0.01):.2f} ± 1.00 | {100 * (0.86 - 0.2 / 3 + 0.01):.2f} ± 1.00 | {acc:.2f} ± 1.00 | +2.00 |" in text
    assert "| ViT | 2:4 |" in text
    assert "| -0.0002 | 80.33 ± 1.00 |" in text  # lambda_w < 0 costs 2 points in the fake
    assert "SR-STE beats STE at 2:4 (Table) | top-1: 82.33 vs 80.33 (diff +2.00, noise 1.41) | reproduced" in text
    assert "STE flips more mask bits than dense training (Fig. 3b) | SAD %: 5.97 vs 1.46 (diff +4.51, noise 0.00) | reproduced" in text
    assert "SR-STE flips fewer mask bits than STE (Fig. 4) | SAD % (STE vs SR-STE): 5.97 vs 2.99 (diff +2.99, noise 0.00) | reproduced" in text
    assert "| **total** |" in text and "layer1.conv" in text
    assert "epochs per run" in text and "first 100 training images" in text
    assert "Runs finished: **" in text and "`nmsparse reproduce --test`" in text
    for name in ("table_accuracy.png", "decay_curves.png", "layer_sad.png", "curves_dense_ste_srste.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in text
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(results["runs"]["resnet_2of4_srste_seed2"]) == 3


def test_transposable_marked_not_run_when_missing(tmp_path, monkeypatch):
    import nmsparse.reproduce.report as rep

    why = "sparsify has no transposable argument"
    monkeypatch.setattr(rep, "transposable_missing", lambda: why)
    monkeypatch.setattr(R, "transposable_missing", lambda: why)
    scale = G.Scale(epochs=1, seeds=(0,))
    R.run_grid(G.build_grid(["transposable"], scale), scale, tmp_path, experiments=["transposable"],
               train_fn=FakeTrain(), make_config=FakeConfig.from_dict, log=lambda s: None)
    text = write_report(tmp_path).read_text()
    assert f"**Transposable cells not run: {why}.**" in text
    assert "| resnet_2of4_srste_transposable-approx_every40_seed0 | not run (transposable masks missing) |" in text
    assert "| 2:4 | 68.00 (n=1) | 68.00 (n=1) | *not run (feature missing)* | *not run (feature missing)* |" in text


def test_partial_grid_report_says_what_ran(tmp_path):
    scale = G.Scale(epochs=2, seeds=(0, 1), nms=("2:4",))
    cells = G.build_grid(["sad"], scale)
    train = FakeTrain(kill_after={"resnet_2of4_srste_seed0": 1})
    with pytest.raises(Killed):
        R.run_grid(cells, scale, tmp_path, experiments=["sad"], train_fn=train, make_config=FakeConfig.from_dict,
                   log=lambda s: None, command="c1")
    text = write_report(tmp_path).read_text()
    assert "Runs finished: **2 of 6**" in text
    assert "| resnet_2of4_srste_seed0 | partial |" in text and "| resnet_2of4_srste_seed1 | todo |" in text
    assert "not run: 1 partial, 1 todo" in text
    assert "had not ended" in text
    assert "(n=1)" in text  # dense has one finished seed


def test_report_without_grid(tmp_path):
    with pytest.raises(ValueError, match="no grid"):
        write_report(tmp_path)


@pytest.fixture
def fake_trainer(monkeypatch):
    train = FakeTrain()
    monkeypatch.setattr(R, "_default_train", lambda: (train, FakeConfig.from_dict))
    return train


def test_cli_demo(tmp_path, fake_trainer, capsys):
    out = tmp_path / "demo"
    assert cli_main(["reproduce", "--demo", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "SR-STE 2:4" in text and f"report: {out}/report.md" in text
    assert "2 epochs, all 60,000 training images" in text
    assert (out / "demo_curves.png").exists()
    assert [c[0] for c in fake_trainer.calls] == ["resnet_dense_seed0", "resnet_2of4_srste_seed0"]


def test_cli_quick_grid_and_list(tmp_path, fake_trainer, capsys):
    out = tmp_path / "q"
    assert cli_main(["reproduce", "--quick", "--out", str(out), "--experiments", "sad,decay", "--no-progress"]) == 0
    assert len(fake_trainer.calls) == 6
    cfg = json.loads((out / "runs" / "resnet_dense_seed0" / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["train_subset"] == 1024
    capsys.readouterr()
    assert cli_main(["reproduce", "--quick", "--out", str(out), "--experiments", "sad,decay", "--list"]) == 0
    assert capsys.readouterr().out.count("done") == 6


@pytest.mark.parametrize("argv, msg", [
    (["--experiments", "tabel"], "unknown experiment"),
    (["--seeds", "x"], "--seeds"),
    (["--nms", "5:4"], "--nms"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--demo", "--quick"], "--demo runs its own"),
])
def test_cli_errors_exit_2_and_write_nothing(tmp_path, fake_trainer, capsys, argv, msg):
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as e:
        code = cli_main(["reproduce", "--out", str(out), *argv])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and fake_trainer.calls == []


def test_cli_refuses_other_settings(tmp_path, fake_trainer, capsys):
    out = tmp_path / "g"
    assert cli_main(["reproduce", "--quick", "--out", str(out), "--experiments", "sad", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["reproduce", "--quick", "--epochs", "2", "--out", str(out), "--experiments", "sad"]) == 2
    assert "other settings" in capsys.readouterr().err
