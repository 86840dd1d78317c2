"""A full disk, a read-only folder, no permission (issue 19, D4/D5): every writer of nmsparse fails
with one line naming the user's path (never a hidden temporary name) and the cause, the CLIs exit
with code 2 without a traceback, nothing earlier is lost and no temporary file stays behind.

Two ways to make a disk fail: ``full_disk`` (monkeypatched, works everywhere: every byte nmsparse
writes through :mod:`nmsparse.plumbing.writing` counts against a budget, past it ``ENOSPC``) and a real small
tmpfs, mounted read-write or read-only (root only; skipped where mounting is not allowed).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid

import pytest
import torch

import nmsparse
from nmsparse.plumbing import checksum
from nmsparse.plumbing import writing
from nmsparse.cli.dispatch import main
from nmsparse.plumbing.errors import WriteError
from nmsparse.export import load_compressed, save_compressed
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.config import TrainConfig
from nmsparse.training.loop import train
from nmsparse.training.models import build_model

SMALL = dict(data="digits", model="mlp", batch_size=64, lr=0.05, train_subset=128, test_subset=50, threads=1)


def full_disk(monkeypatch, budget: int, code: int = errno.ENOSPC) -> None:
    """From now on, writes through nmsparse.plumbing.writing fail with ``code`` once ``budget`` bytes are spent."""
    left = [budget]
    real = writing._Stream.write

    def write(self, b):
        n = memoryview(b).nbytes
        if n > left[0]:
            raise OSError(code, os.strerror(code))
        left[0] -= n
        return real(self, b)

    monkeypatch.setattr(writing._Stream, "write", write)


def litter(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def resnet_24():
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, 2, 4)
    return nmsparse.finalize(model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(epochs=1, out=str(out), **SMALL), progress=False, log=None)
    return out


# --- the writer -----------------------------------------------------------------------------

@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EROFS, "the file system is read-only"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_atomic_write_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, code, cause):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    full_disk(monkeypatch, 4, code)
    with pytest.raises(WriteError) as e:
        writing.atomic_write(path, lambda f: f.write(b"new contents"))
    assert str(e.value) == f"cannot write {path}: {cause}" and e.value.errno == code
    assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)
    assert path.read_bytes() == b"old" and litter(tmp_path) == []


def test_atomic_write_into_a_missing_folder(tmp_path):
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'no' / 'f'}: its folder does not exist"):
        writing.atomic_write(tmp_path / "no" / "f", lambda f: f.write(b"x"))


def test_torch_save_reports_the_errno(tmp_path, monkeypatch):
    """torch.save into a real file fails with an opaque RuntimeError (inline_container.cc); through
    atomic_write it is the OSError with its errno, named after checkpoint.pt."""
    path = tmp_path / "checkpoint.pt"
    full_disk(monkeypatch, 1000)
    with pytest.raises(WriteError, match=f"cannot write {path}: no space left on the device$"):
        ckpt.save(path, {"model": {"w": torch.zeros(10_000)}})
    assert litter(tmp_path) == [] and not path.exists()


def test_save_compressed_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = resnet_24()
    save_compressed(model, path, 2, 4)
    before = path.read_bytes()
    full_disk(monkeypatch, 10_000)
    with pytest.raises(WriteError, match=f"^cannot write {path}: no space left on the device$"):
        save_compressed(model, path, 2, 4)
    assert path.read_bytes() == before and litter(tmp_path) == []
    load_compressed(path, build_model("resnet"))


# --- the CLIs ---------------------------------------------------------------------------------

def test_train_checkpoint_on_a_full_disk_loses_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    cfg = TrainConfig(epochs=2, out=str(out), **SMALL)
    with pytest.raises(WriteError, match=f"^cannot write {out / 'checkpoint.pt'}: no space left on the device$"):
        train(cfg, progress=False, log=None,  # the disk fills up after epoch 1's checkpoint
              on_epoch_end=lambda r: full_disk(monkeypatch, 0) if r["epoch"] == 1 else None)
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1 and litter(out) == []
    monkeypatch.undo()
    assert main(["train", *_argv(out, epochs=2), "--resume"]) == 0  # space again: it resumes
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 2
    capsys.readouterr()
    full_disk(monkeypatch, 2000)  # the CLI: config.json fits, the first checkpoint does not
    assert main(["train", *_argv(tmp_path / "r2", epochs=1)]) == 2
    assert one_line(capsys.readouterr().err) == (f"nmsparse train: error: cannot write {tmp_path / 'r2' / 'checkpoint.pt'}: "
                                                 "no space left on the device")


def _argv(out, epochs):
    return ["--data", "digits", "--model", "mlp", "--epochs", str(epochs), "--batch-size", "64", "--lr", "0.05",
            "--train-subset", "128", "--test-subset", "50", "--threads", "1", "--no-progress", "--out", str(out)]


@pytest.mark.parametrize("fmt,name", [("nmsparse", "model.nmsparse.safetensors"), ("dense", "model.safetensors")])
def test_export_full_disk(run, tmp_path, monkeypatch, capsys, fmt, name):
    out = tmp_path / "e"
    assert main(["export", "--checkpoint", str(run / "final.safetensors"), "--format", fmt, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    full_disk(monkeypatch, 100)
    rc = main(["export", "--checkpoint", str(run / "final.safetensors"), "--format", fmt, "--out", str(out),
               "--overwrite"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == (f"nmsparse export: error: cannot write {out / name}: "
                                                 "no space left on the device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and litter(out) == []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_prune_full_disk(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    full_disk(monkeypatch, 0)
    rc = main(["prune", "--checkpoint", str(run / "final.safetensors"), "--nm", "2:4", "--calib-samples", "10",
               "--test-subset", "50", "--no-progress", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert one_line(err) == f"nmsparse prune: error: cannot write {out / 'config.json'}: no space left on the device"
    assert litter(out) == []


# --- a real small tmpfs (root) ----------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs at tmp_path/fs, yielded with a function remounting it read-only."""
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")

    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)

    try:
        yield d, read_only
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_real_full_disk_and_read_only_folder(run, tmpfs, capsys):
    d, read_only = tmpfs
    model = resnet_24()  # about 185 KB compressed: more than the 124 KB left beside the filler
    (d / "filler").write_bytes(b"\0" * (900 << 10))
    with pytest.raises(WriteError, match=f"^cannot write {d / 'm.safetensors'}: no space left on the device$"):
        save_compressed(model, d / "m.safetensors", 2, 4)
    assert [p.name for p in d.iterdir()] == ["filler"]
    (d / "filler").unlink()
    out = d / "e"
    argv = ["export", "--checkpoint", str(run / "final.safetensors"), "--out", str(out)]
    assert main(argv + ["--format", "dense"]) == 0  # the mlp fits
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    read_only()
    for fmt in ("nmsparse", "dense"):
        assert main(argv + ["--format", fmt, "--overwrite"]) == 2
        assert one_line(capsys.readouterr().err) == (f"nmsparse export: error: cannot write {out}: "
                                                     "the file system is read-only")
    assert main(argv[:-1] + [str(d / "new"), "--format", "nmsparse"]) == 2
    assert one_line(capsys.readouterr().err).endswith(f"cannot write {d / 'new'}: the file system is read-only")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(WriteError, match=f"^cannot write {d / 'x.pt'}: the file system is read-only$"):
        ckpt.save(d / "x.pt", {"a": torch.zeros(1)})


def test_reproduce_stops_the_grid_on_a_full_disk(tmp_path):
    """A failed write is not one cell's failure (the next cells would fail alike): the grid stops with the
    one-line WriteError, which the CLI prints with exit code 2."""
    from nmsparse.reproduce import grid as G
    from nmsparse.reproduce.runner import run_grid

    calls = []

    def train_fn(config, *, resume=False, progress=True):
        calls.append(config.out)
        raise WriteError(f"{config.out}/checkpoint.pt", "no space left on the device", errno.ENOSPC)

    scale = G.Scale(epochs=1, seeds=(0,), train_subset=64, test_subset=32, data="digits", threads=1)
    with pytest.raises(WriteError, match="checkpoint.pt: no space left on the device$"):
        run_grid(G.demo_cells(scale), scale, tmp_path, experiments=["demo"], train_fn=train_fn,
                 make_config=TrainConfig.from_dict, log=lambda s: None)
    assert len(calls) == 1
