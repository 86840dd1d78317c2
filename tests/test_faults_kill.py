"""kill -9 during writes (issue 19, D11): the previous file stays loadable, a killed writer's temporary
files are removed by the next write into the same folder, and no temporary folder is ever left
beside ``--out`` (``nmsparse export`` stages inside it).

Each case runs the command in a child process whose writes through :mod:`nmsparse.plumbing.writing` stop for
good after a few KB of a large file; the test waits for the child's temporary file to appear, kills
it with SIGKILL, checks the litter is there (so the test can fail), then runs the command again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nmsparse
from nmsparse.plumbing import writing
from nmsparse.export import load_compressed, save_compressed
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.models import build_model

SRC = str(Path(nmsparse.__file__).resolve().parents[1])

# The child: nmsparse.plumbing.writing's writes hang after 4 KB of any file larger than that; then CMD runs.
CHILD = """
import sys, time
from nmsparse.plumbing import writing
real = writing._Stream.write
def write(self, b):
    self.done = getattr(self, "done", 0) + memoryview(b).nbytes
    if self.done > 4096:
        open(sys.argv[1], "w").close()  # tell the parent: inside a write
        time.sleep(600)
    return real(self, b)
writing._Stream.write = write
exec(sys.argv[2])
"""


def killed_during_write(tmp_path, code: str) -> None:
    flag = tmp_path / f"writing-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(flag), code], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended before writing: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the child never reached a write")
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def resnet_24():
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, 2, 4)
    return nmsparse.finalize(model)


@pytest.mark.slow
def test_save_compressed_killed(tmp_path):
    path = tmp_path / "m.safetensors"
    model = resnet_24()
    save_compressed(model, path, 2, 4)
    before = path.read_bytes()
    killed_during_write(tmp_path, f"""
import torch, nmsparse
from nmsparse.training.models import build_model
torch.manual_seed(1); m = build_model("resnet"); nmsparse.sparsify(m, 2, 4); m = nmsparse.finalize(m)
nmsparse.save_compressed(m, {str(path)!r}, 2, 4)""")
    assert path.read_bytes() == before  # the previous file, whole
    left = hidden(tmp_path)
    assert len(left) == 1 and left[0].startswith(".m.safetensors.") and left[0].endswith(".tmp"), left
    save_compressed(model, tmp_path / "other.safetensors", 2, 4)  # any later save into the folder cleans up
    assert hidden(tmp_path) == []
    load_compressed(path, build_model("resnet"))


@pytest.mark.slow
def test_train_killed_in_a_checkpoint_write(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--model", "mlp", "--epochs", "2", "--batch-size", "64",
            "--train-subset", "128", "--test-subset", "50", "--threads", "1", "--no-progress", "--out", str(out)]
    killed_during_write(tmp_path, f"from nmsparse.cli.dispatch import main; main({argv!r})")
    left = hidden(out)
    assert any(n.startswith(".checkpoint.pt.") and n.endswith(".tmp") for n in left), left
    from nmsparse.cli.dispatch import main

    assert main(argv + ["--resume"]) == 0
    assert hidden(out) == [] and ckpt.load(out / "checkpoint.pt")["epoch"] == 2


@pytest.mark.slow
def test_export_killed_leaves_nothing_beside_out(tmp_path):
    from nmsparse.cli.dispatch import main
    from nmsparse.training.config import TrainConfig
    from nmsparse.training.loop import train

    run = tmp_path / "run"
    train(TrainConfig(data="digits", model="mlp", epochs=1, train_subset=128, test_subset=50, threads=1,
                      out=str(run)), progress=False, log=None)
    out = tmp_path / "exported"
    argv = ["export", "--checkpoint", str(run / "final.safetensors"), "--format", "dense", "--out", str(out)]
    for _ in range(2):
        killed_during_write(tmp_path, f"from nmsparse.cli.dispatch import main; main({argv!r})")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("writing-")) == ["exported", "run"]
    assert len(hidden(out)) == 1  # the second killed export's staging folder, inside --out (it removed the first's)
    assert main(argv) == 0
    assert hidden(out) == [] and sorted(p.name for p in out.iterdir()) == [
        "config.json", "export_report.json", "model.safetensors"]


def test_stale_rules(tmp_path):
    """Only names of our pattern whose process is gone (or old legacy names) are removed."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = writing._HOST
    names = {f".a.{host}.{dead}-0123abcd.tmp": True, f".b.{host}.{os.getpid()}-0123abcd.tmp": False,  # alive: kept
             f".e.{host}.{dead}-0123abcd.tmpdir": True, ".c.abcd1234.tmp": False, "c.abcd1234.tmp": False,
             "keep.tmp": False, ".nmsparse-export.abcd1234": False,
             f".f.otherhost.{dead}-0123abcd.tmp": False}  # another machine's process: judged by age only
    for n in names:
        (tmp_path / n).mkdir() if n.endswith("tmpdir") or "export" in n else (tmp_path / n).write_text("x")
    assert sorted(writing.remove_stale(tmp_path)) == sorted(n for n, gone in names.items() if gone)
    old = time.time() - writing.LEGACY_AGE_S - 10
    os.utime(tmp_path / ".c.abcd1234.tmp", (old, old))  # a legacy name (no process id), long untouched
    os.utime(tmp_path / ".nmsparse-export.abcd1234", (old, old))
    os.utime(tmp_path / f".f.otherhost.{dead}-0123abcd.tmp", (old, old))
    assert sorted(writing.remove_stale(tmp_path)) == [".c.abcd1234.tmp", f".f.otherhost.{dead}-0123abcd.tmp",
                                                      ".nmsparse-export.abcd1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".b.{host}.{os.getpid()}-0123abcd.tmp",
                                                                  "c.abcd1234.tmp", "keep.tmp"])
