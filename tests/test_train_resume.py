"""Checkpoints: written atomically every epoch, loadable with weights_only=True, and a killed run
resumed from one reaches the same final weights, bit for bit on CPU, as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nmsparse.training import checkpoint as ckpt
from nmsparse.training.config import TrainConfig
from nmsparse.training.loop import train

BASE = dict(data="digits", epochs=3, batch_size=64, lr=0.05, train_subset=384, test_subset=100, threads=1)


class _Killed(Exception):
    pass


def _kill_after_first_epoch(record: dict) -> None:
    if record["epoch"] == 1:
        raise _Killed


def _assert_same_run(a: Path, b: Path) -> None:
    fa, fb = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    ca, cb = ckpt.load(a / "checkpoint.pt"), ckpt.load(b / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    ma = [json.loads(s) for s in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(s) for s in (b / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(ma) == strip(mb) and len(ma) == BASE["epochs"]


@pytest.mark.parametrize("model,nm,method", [("resnet", "2:4", "srste"), ("mlp", "dense", "srste"),
                                             ("vit", "1:4", "ste")])
def test_resume_after_injected_kill_is_bit_identical(tmp_path, model, nm, method):
    cfg = dict(BASE, model=model, nm=nm, method=method, update_every=2 if model == "vit" else 1)
    if model == "vit":
        cfg.update(optimizer="adamw", lr=1e-3, weight_decay=0.05)
    full = tmp_path / "full"
    train(TrainConfig(**cfg, out=str(full)), progress=False, log=None)

    part = tmp_path / "part"
    with pytest.raises(_Killed):
        train(TrainConfig(**cfg, out=str(part)), progress=False, log=None, on_epoch_end=_kill_after_first_epoch)
    assert ckpt.load(part / "checkpoint.pt")["epoch"] == 1
    assert not (part / "final.safetensors").exists()
    records = train(TrainConfig(**cfg, out=str(part)), resume=True, progress=False, log=None)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    _assert_same_run(full, part)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Run the CLI in a subprocess, SIGKILL it once its first epoch is checkpointed, resume it."""
    args = ["--data", "digits", "--model", "resnet", "--epochs", "3", "--batch-size", "64", "--train-subset",
            "384", "--test-subset", "100", "--threads", "1", "--lr", "0.05", "--no-progress"]
    cmd = [sys.executable, "-m", "nmsparse", "train", *args]
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(cmd + ["--out", str(full)], check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(cmd + ["--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (part / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (part / "checkpoint.pt").exists()
    killed_at = ckpt.load(part / "checkpoint.pt")["epoch"]
    assert killed_at >= 1
    resumed = subprocess.run(cmd + ["--out", str(part), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if killed_at < 3:
        assert f"resuming {part} after epoch {killed_at}/3" in resumed.stdout
    _assert_same_run(full, part)


def test_checkpoint_contents_and_no_temp_files(tmp_path):
    out = tmp_path / "r"
    train(TrainConfig(**dict(BASE, epochs=1), model="mlp", out=str(out)), progress=False, log=None)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "final.safetensors",
                                                     "metrics.jsonl"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled code
    assert {"format", "epoch", "config", "model", "optimizer", "scheduler", "rng", "sad", "records"} <= set(state)
    assert state["epoch"] == 1 and isinstance(state["rng"]["torch"], torch.Tensor)
    assert set(state["sad"]["initial"]) == {"net.3.weight"}
    assert state["scheduler"]["last_epoch"] == 384 // 64
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    ckpt.atomic_write(p, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(p, boom)
    assert p.read_bytes() == b"old" and [q.name for q in tmp_path.iterdir()] == ["f.bin"]


def test_resume_edge_cases(tmp_path):
    cfg = TrainConfig(**dict(BASE, epochs=1), model="mlp", out=str(tmp_path / "r"))
    # no checkpoint yet: resume starts fresh
    first = train(cfg, resume=True, progress=False, log=None)
    # finished run: nothing is trained again, the records come back
    again = train(cfg, resume=True, progress=False, log=None)
    assert again == first
    # other settings than the checkpoint's: refused
    with pytest.raises(ValueError, match="other settings.*lr=0.05, now 0.1"):
        train(TrainConfig(**dict(BASE, epochs=1, lr=0.1), model="mlp", out=str(tmp_path / "r")), resume=True,
              progress=False, log=None)
    # fields that do not change the result may differ
    train(TrainConfig(**dict(BASE, epochs=1, threads=2), model="mlp", out=str(tmp_path / "r")), resume=True,
          progress=False, log=None)
