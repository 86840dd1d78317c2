"""Progress output: a tqdm bar on a terminal, a bounded number of whole lines (no carriage returns)
in a log, nothing when off; one helper (nmsparse.plumbing.progress) behind train, prune and reproduce, with
--progress / --no-progress and $NMSPARSE_PROGRESS."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmsparse.plumbing import progress as P
from nmsparse.cli.dispatch import build_parser, main
from nmsparse.training.config import TrainConfig
from nmsparse.training.loop import train

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = dict(data="digits", model="mlp", epochs=2, batch_size=16, lr=0.05, train_subset=256, test_subset=50,
            threads=1)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_resolve_modes(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    assert P.resolve(True, _Tty()) == P.resolve(None, _Tty()) == P.resolve("auto", _Tty()) == "bar"
    assert P.resolve(True, io.StringIO()) == P.resolve("auto", io.StringIO()) == "lines"
    assert P.resolve(False, _Tty()) == "off"
    assert [P.resolve(m, _Tty()) for m in ("bar", "lines", "off")] == ["bar", "lines", "off"]
    with pytest.raises(ValueError, match="progress must be one of auto, bar, lines, off, got 'fancy'"):
        P.resolve("fancy")
    monkeypatch.setenv(P.ENV, "Lines")
    assert P.resolve(True, _Tty()) == "lines"  # the variable overrides auto-detection...
    assert P.resolve("bar", io.StringIO()) == "bar"  # ...but not an explicit mode
    assert P.resolve("auto", _Tty()) == "bar"
    monkeypatch.setenv(P.ENV, "loud")
    with pytest.raises(ValueError, match=r"\$NMSPARSE_PROGRESS must be one of auto, bar, lines, off, got 'loud'"):
        P.resolve(None)


def _drive(monkeypatch, mode, total=500, seconds_per_step=1.25, **kw) -> str:
    """Run a Progress over ``total`` steps on a fake clock; return what it wrote."""
    t = [0.0]
    monkeypatch.setattr(P, "_now", lambda: t[0])
    stream = io.StringIO()
    bar = P.Progress(total, "epoch 1/3", mode=mode, unit="step", stream=stream, **kw)
    for _ in range(total):
        t[0] += seconds_per_step
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()  # idempotent
    return stream.getvalue()


def test_lines_mode_writes_a_bounded_number_of_whole_lines(monkeypatch):
    out = _drive(monkeypatch, "lines")  # 500 steps over 625 s: one line a minute, then the closing line
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 11
    assert lines[0] == "epoch 1/3: 48/500 steps (10%), 60s so far, loss 0.5"
    assert lines[9] == "epoch 1/3: 480/500 steps (96%), 600s so far, loss 0.5"
    assert lines[-1] == "epoch 1/3: 500/500 steps in 625.0s, loss 0.5"
    assert _drive(monkeypatch, "lines", summary=False).splitlines() == lines[:-1]
    assert _drive(monkeypatch, "lines", seconds_per_step=0.1) == "epoch 1/3: 500/500 steps in 50.0s, loss 0.5\n"
    assert _drive(monkeypatch, "off") == ""


def test_bar_mode_is_tqdm(monkeypatch):
    out = _drive(monkeypatch, "bar", total=50)
    assert "\r" in out and "epoch 1/3" in out and "50/50" in out


def test_every_progress_display_uses_the_helper():
    """No module but nmsparse.plumbing.progress draws tqdm bars itself."""
    users = [p for p in (SRC / "nmsparse").rglob("*.py") if p.name != "progress.py"
             and ("import tqdm" in p.read_text() or "from tqdm" in p.read_text())]
    assert users == []


def test_every_cli_has_the_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("train", "prune", "reproduce"):
        text = sub.choices[name].format_help()
        assert "--progress {auto,bar,lines,off}" in text and "--no-progress" in text and P.ENV in text, name


def test_bad_flag_and_bad_variable_are_one_line_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["train", "--progress", "fancy"])
    assert e.value.code == 2 and "invalid choice: 'fancy'" in capsys.readouterr().err
    monkeypatch.setenv(P.ENV, "loud")
    out = tmp_path / "r"
    assert main(["train", "--data", "digits", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("nmsparse train: error: $NMSPARSE_PROGRESS must be one of auto, bar, lines, "
                                       "off, got 'loud'\n")
    assert not out.exists()
    assert main(["reproduce", "--demo", "--out", str(out)]) == 2
    assert "$NMSPARSE_PROGRESS must be one of" in capsys.readouterr().err
    monkeypatch.setenv(P.ENV, "off")  # the variable is checked, but --no-progress needs none
    assert P.from_args(build_parser().parse_args(["train", "--no-progress"])) == "off"


def test_train_cli_in_a_log_writes_no_carriage_returns(tmp_path):
    """`nmsparse train ... 2> log`: stderr is a pipe, so no bar (the case `make demo | tee log`)."""
    cmd = [sys.executable, "-m", "nmsparse", "train", *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()),
           "--out", str(tmp_path / "r")]
    env = {k: v for k, v in os.environ.items() if k != P.ENV}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "\r" not in res.stdout
    assert len(res.stderr.splitlines()) <= TINY["epochs"]  # at most a line a minute: none for seconds-long epochs
    assert [s.split()[:2] for s in res.stdout.splitlines()[:2]] == [["epoch", "1/2"], ["epoch", "2/2"]]


def test_train_progress_modes_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    cfg = TrainConfig(**TINY, out=str(tmp_path / "r"))
    train(cfg, progress=True, log=None)  # stderr captured (not a terminal): one closing line per epoch
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[0] for line in err.splitlines()] == ["epoch 1/2", "epoch 2/2"]
    assert "16/16 steps in " in err
    monkeypatch.setenv(P.ENV, "bar")  # forced bar: tqdm's carriage returns, the flood this avoids in logs
    train(cfg, progress=True, log=None)
    err = capsys.readouterr().err
    assert "\r" in err and "epoch 1/2" in err and "epoch 2/2" in err
    train(cfg, progress=False, log=None)
    assert capsys.readouterr().err == ""


def _checkpoint(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from nmsparse.training.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", image_size=8, in_channels=1, num_classes=10)
    path = tmp_path / "final.safetensors"
    from nmsparse.plumbing.checksum import sign  # as 'nmsparse train' writes it

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=sign(tensors, {"config": '{"model": "mlp", "data": "digits"}'}))
    return path


@pytest.mark.parametrize("flags,expect", [([], "lines"), (["--progress", "lines"], "lines"),
                                          (["--progress", "bar"], "bar"), (["--no-progress"], "off")])
def test_prune_cli_progress(tmp_path, capsys, monkeypatch, flags, expect):
    monkeypatch.delenv(P.ENV, raising=False)
    args = ["prune", "--checkpoint", str(_checkpoint(tmp_path)), "--out", str(tmp_path / "o"), "--method",
            "magnitude", "--calib-samples", "10", "--test-subset", "20", *flags]
    assert main(args) == 0
    err = capsys.readouterr().err
    if expect == "lines":
        assert "\r" not in err and err.startswith("prune 2:4 magnitude: 1/1 layers in ") and err.count("\n") == 1
    elif expect == "bar":
        assert "\r" in err and "prune 2:4 magnitude" in err
    else:
        assert err == ""


def test_reproduce_passes_the_mode_and_its_runs_write_lines(tmp_path, capsys, monkeypatch):
    from nmsparse.cli import reproduce as RC
    from nmsparse.reproduce import grid as G
    from nmsparse.reproduce.runner import run_grid

    seen = []
    monkeypatch.setattr(RC, "run_grid", lambda *a, **kw: seen.append(kw["progress"]) or [])
    monkeypatch.setattr(RC, "write_report", lambda out, d=None: Path(out) / "report.md")
    monkeypatch.setattr(RC, "_print_demo", lambda *a: None)
    monkeypatch.delenv(P.ENV, raising=False)
    for flags in ([], ["--progress", "bar"], ["--no-progress"]):
        assert RC.main(build_parser().parse_args(["reproduce", "--demo", "--out", str(tmp_path / "x"), *flags])) == 0
    assert seen == ["lines", "bar", "off"]
    # a real (tiny) grid with the default mode: the runner's lines and the epochs' summaries, no bar
    scale = G.Scale(epochs=1, seeds=(0,), train_subset=64, test_subset=32, data="digits", threads=1)
    log: list[str] = []
    run_grid(G.demo_cells(scale), scale, tmp_path / "g", experiments=["demo"], progress=True, log=log.append)
    out, err = capsys.readouterr()
    assert "\r" not in err + out and err == ""
    assert len(log) == 4 and sum(line.startswith("epoch   1/1") for line in out.splitlines()) == 2
