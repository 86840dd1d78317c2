"""Every load path fails with one clear LoadError (one line naming the file, the problem and what to
do) and changes nothing: nmsparse.plumbing.io's readers, checkpoint.load, `nmsparse train --resume`,
`nmsparse prune --checkpoint` and `nmsparse reproduce` (its grid.json, a run's config.json and the
checkpoint it would resume). Cases: missing, a directory, empty, truncated, garbage, another format,
Python objects in a pickle, a safetensors header that lies, another model, other N:M settings."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nmsparse.plumbing import checksum
from nmsparse.cli.dispatch import main
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.io import check_state_dict, read_json, read_safetensors, read_torch, state_dict_mismatch
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.config import TrainConfig
from nmsparse.training.loop import train

SMALL = dict(data="digits", model="mlp", epochs=1, batch_size=64, lr=0.05, train_subset=128, test_subset=50,
             threads=1)
SRC = Path(__file__).resolve().parents[1] / "src"


class Opaque:  # a class torch.load(weights_only=True) must refuse to rebuild
    def __init__(self) -> None:
        self.x = 1


def _one_line(e: BaseException, path: os.PathLike | str, *fragments: str) -> str:
    text = str(e)
    assert "\n" not in text and str(path) in text, text
    for f in fragments:
        assert f in text, (f, text)
    return text


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 1-epoch 2:4 MLP run on digits: checkpoint.pt, final.safetensors, config.json."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(TrainConfig(**SMALL, out=str(out)), progress=False, log=None)
    return out


def _copy_run(run: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in run.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- nmsparse.plumbing.io -----------------------------------------------------------------------------

def _damaged_torch_files(good: bytes) -> dict[str, tuple[bytes, str]]:
    flipped = bytearray(good)
    flipped[200] ^= 0xFF  # inside the pickle: decodes to nonsense
    return {
        "empty": (b"", "is empty (0 bytes)"),
        "truncated": (good[: len(good) // 2], "is truncated or corrupted (not a complete torch.save zip archive)"),
        "garbage": (bytes(range(256)) * 20, "is not a PyTorch checkpoint (torch.save) file"),
        "text": (b'{"epoch": 1}', "is not a PyTorch checkpoint (torch.save) file"),
        "code": (_torch_bytes({"x": Opaque()}), "holds Python objects other than tensors and plain data, refused"),
        "flipped": (bytes(flipped), "is corrupted"),
    }


def test_read_torch_errors(tmp_path, run):
    good = (run / "checkpoint.pt").read_bytes()
    for name, (data, problem) in _damaged_torch_files(good).items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(data)
        with pytest.raises(LoadError) as e:
            read_torch(p)
        _one_line(e.value, p, "cannot load", problem)
        assert e.value.path == str(p) and e.value.problem.startswith(problem.split(" (")[0])
    with pytest.raises(LoadError, match="nope.pt: not found$"):
        read_torch(tmp_path / "nope.pt")
    with pytest.raises(LoadError, match=": is a directory, not a file$"):
        read_torch(tmp_path)
    assert isinstance(LoadError("f", "p"), ValueError)  # CLIs and older callers catch ValueError


def _safetensors_with_header(good: bytes, edit) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _damaged_safetensors_files(good: bytes, torch_file: bytes) -> dict[str, tuple[bytes, str]]:
    def longer(h):
        t = _first_tensor(h)
        t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][1] + 4096]

    def reshape(h):
        _first_tensor(h)["shape"] = [3, 3]

    def dtype(h):
        _first_tensor(h)["dtype"] = "Q7"

    def metadata(h):
        h["__metadata__"] = {"config": 5}

    lies = "has a header that does not match its data (a tensor's shape, dtype or byte offsets are wrong)"
    return {
        "empty": (b"", "is empty (0 bytes)"),
        "short": (good[:5], "is too short to be a safetensors file (truncated)"),
        "truncated_header": (good[:40], "is truncated (shorter than the header length its first 8 bytes give)"),
        "truncated": (good[: len(good) - 100], "is truncated or has bytes its header does not account for"),
        "trailing": (good + b"\0" * 64, "is truncated or has bytes its header does not account for"),
        "garbage": (bytes(range(256)) * 20, "is not a safetensors file"),
        "huge_length": (struct.pack("<Q", 2 ** 40) + good[8:], "is not a safetensors file"),
        "torch": (torch_file, "is a torch.save archive (e.g. checkpoint.pt), not a safetensors file"),
        "offsets_lie": (_safetensors_with_header(good, longer), lies),
        "shape_lies": (_safetensors_with_header(good, reshape), lies),
        "dtype_lies": (_safetensors_with_header(good, dtype), "has a corrupted header (not valid safetensors JSON)"),
        "metadata_lies": (_safetensors_with_header(good, metadata),
                          "has a corrupted header (not valid safetensors JSON)"),
    }


def test_read_safetensors_errors(tmp_path, run):
    good = (run / "final.safetensors").read_bytes()
    tensors, meta = read_safetensors(run / "final.safetensors")
    assert json.loads(meta["config"])["model"] == "mlp" and "net.1.weight" in tensors
    for name, (data, problem) in _damaged_safetensors_files(good, (run / "checkpoint.pt").read_bytes()).items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(LoadError) as e:
            read_safetensors(p)
        _one_line(e.value, p, problem)
    with pytest.raises(LoadError, match="not found"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(LoadError, match="is a directory, not a file"):
        read_safetensors(tmp_path)


def test_read_json_errors(tmp_path):
    cases = {"empty": (b"  \n", "is empty"), "torn": (b'{"a": [1, 2', "is not valid JSON (Expecting"),
             "binary": (b"\xff\xfe\x00garbage", "is not a text file (invalid UTF-8)")}
    for name, (data, problem) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_bytes(data)
        with pytest.raises(LoadError) as e:
            read_json(p)
        _one_line(e.value, p, problem)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json") == {"a": 1}


def test_state_dict_mismatch_names_every_kind_of_difference(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    sd = model.state_dict()
    assert state_dict_mismatch(sd, dict(sd)) is None
    other = {k: v for k, v in sd.items() if k != "1.bias"}
    other["0.weight"] = torch.zeros(8, 5)
    other["extra"] = torch.zeros(1)
    other["0.bias"] = [0.0] * 8
    why = state_dict_mismatch(sd, other)
    assert why == ("1 tensor(s) missing (1.bias); 1 unexpected (extra); 1 not a tensor (0.bias); "
                   "1 with another shape (0.weight (8, 5) in the file, (8, 4) in the model)")
    many = {f"x{i}": torch.zeros(1) for i in range(5)}
    assert "5 unexpected (x0, x1, x2 and 2 more)" in state_dict_mismatch({}, many)
    assert state_dict_mismatch(sd, [1, 2]) == "it holds a list instead of a dict of tensors"
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(LoadError) as e:
        check_state_dict(sd, other, tmp_path / "w.safetensors", what="the tiny model", hint="pass another file")
    _one_line(e.value, tmp_path / "w.safetensors", "does not fit the tiny model: 1 tensor(s) missing",
              "; pass another file")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- checkpoint.load -------------------------------------------------------------------------

def test_checkpoint_load_checks_the_structure(tmp_path, run):
    state = ckpt.load(run / "checkpoint.pt")
    p = tmp_path / "c.pt"
    cases = [
        ([1, 2], "is not an nmsparse training checkpoint (a torch.save file, but of a list without the 'format' entry)"),
        ({"model": {}}, "is not an nmsparse training checkpoint"),
        (dict(state, format=99), "is an nmsparse checkpoint of format 99; this version reads format 1"),
        ({k: v for k, v in state.items() if k != "model"}, "is an incomplete nmsparse training checkpoint (no 'model' entry)"),
        (dict(state, epoch="1"), "its 'epoch' entry is a str, not a int"),
        (dict(state, epoch=True), "its 'epoch' entry is a bool, not a int"),
        (dict(state, sad={"initial": {}}), "no sad.previous masks"),
        (dict(state, rng={"python": [1]}), "no torch RNG state"),
    ]
    for obj, problem in cases:
        p.write_bytes(_torch_bytes(obj))
        with pytest.raises(LoadError) as e:
            ckpt.load(p)
        _one_line(e.value, p, problem)
    for name, (data, problem) in _damaged_torch_files((run / "checkpoint.pt").read_bytes()).items():
        p.write_bytes(data)
        with pytest.raises(LoadError, match=problem.split(" (")[0]):
            ckpt.load(p)


def test_checkpoint_checksum_finds_damaged_tensor_bytes(tmp_path, run):
    """torch.load reads a checkpoint whose tensor bytes were damaged without complaint; the recorded
    checksum makes every such change an error, never a silently different state."""
    good = (run / "checkpoint.pt").read_bytes()
    state = ckpt.load(run / "checkpoint.pt")
    assert state["checksum"] == ckpt.checksum(state)
    p = tmp_path / "c.pt"
    found = 0
    for pos in range(150, len(good), len(good) // 40):
        damaged = bytearray(good)
        damaged[pos] ^= 0x10
        p.write_bytes(bytes(damaged))
        try:
            loaded = ckpt.load(p)
        except LoadError as e:
            _one_line(e, p, "cannot load")
            found += 1
            continue
        assert ckpt.checksum(loaded) == state["checksum"]  # a byte outside the contents (zip bookkeeping)
    assert found >= 30
    p.write_bytes(good)
    raw = torch.load(p, weights_only=True)
    raw["model"] = {k: v.clone() for k, v in raw["model"].items()}
    next(iter(raw["model"].values())).view(-1)[0] += 1  # one value changed, the file itself well formed
    p.write_bytes(_torch_bytes(raw))
    with pytest.raises(LoadError, match="is corrupted \\(its contents do not match the checksum recorded when it was "
                                        "written\\)$"):
        ckpt.load(p)
    del raw["checksum"]  # a checkpoint written before checksums existed still loads, with a note
    p.write_bytes(_torch_bytes(raw))
    with pytest.warns(checksum.UnverifiedFileWarning, match="carries no checksum"):
        assert "checksum" not in ckpt.load(p)


# --- train --resume --------------------------------------------------------------------------

def _resume_fails(folder: Path, *fragments: str, **overrides) -> str:
    before = _snapshot(folder)
    with pytest.raises(LoadError) as e:
        train(TrainConfig(**{**SMALL, "epochs": 2, **overrides}, out=str(folder)), resume=True, progress=False,
              log=None)
    assert _snapshot(folder) == before  # nothing overwritten, nothing added
    return _one_line(e.value, folder / "checkpoint.pt", "cannot resume from", *fragments)


def test_resume_from_a_damaged_file_is_refused(tmp_path, run):
    for name, (data, problem) in _damaged_torch_files((run / "checkpoint.pt").read_bytes()).items():
        folder = _copy_run(run, tmp_path / name)
        (folder / "checkpoint.pt").write_bytes(data)
        _resume_fails(folder, problem.split(" (")[0],
                      "; restore it, or start the run afresh with --overwrite instead of --resume")
    folder = _copy_run(run, tmp_path / "dir")
    (folder / "checkpoint.pt").unlink()
    (folder / "checkpoint.pt").mkdir()
    _resume_fails(folder, "is a directory, not a file")
    # without --resume a directory where the run writes a file is named too, before anything is written
    with pytest.raises(ValueError, match="checkpoint.pt is a directory where the run writes a file"):
        train(TrainConfig(**SMALL, out=str(folder)), progress=False, log=None)
    assert (folder / "config.json").read_bytes() == (run / "config.json").read_bytes()


@pytest.mark.parametrize("overrides,shown", [
    ({"nm": "4:8"}, "nm='2:4', now '4:8'"),
    ({"method": "ste"}, "method='srste', now 'ste'"),
    ({"layout": "flat"}, "layout='channels', now 'flat'"),
    ({"transposable": True}, "transposable=False, now True"),
    ({"nm": "dense"}, "nm='2:4', now 'dense'"),
    ({"model": "resnet"}, "model='mlp', now 'resnet'"),
])
def test_resume_with_other_settings_is_refused(tmp_path, run, overrides, shown):
    folder = _copy_run(run, tmp_path / "r")
    _resume_fails(folder, f"was made with other settings ({shown})",
                  "; resume with the checkpoint's settings, start afresh with --overwrite, or use another --out",
                  epochs=1, **overrides)


def _edited(state: dict, path: tuple, value) -> dict:
    """A deep-enough copy of ``state`` with ``state[path[0]]...[path[-1]] = value`` (``None``: deleted)."""
    out = dict(state)
    node = out
    for k in path[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def test_resume_from_a_state_that_does_not_fit_is_refused(tmp_path, run):
    """Same recorded settings, but a state from another model, with masks that are not 2:4, or with a
    damaged optimizer / SAD / RNG / epoch entry: found before the model or any file is changed."""
    state = ckpt.load(run / "checkpoint.pt")
    mask_key = "net.3.parametrizations.weight.0.mask"
    assert mask_key in state["model"]
    opt = state["optimizer"]
    first = min(opt["state"])
    bad_opt = dict(opt, state={**opt["state"], first: {"momentum_buffer": torch.zeros(3, 3)}})
    cases = [
        (("model", "net.1.weight"), torch.zeros(5, 5),
         "its model state does not fit model 'mlp' with these settings: 1 with another shape (net.1.weight (5, 5)"),
        (("model", "net.3.bias"), None, "1 tensor(s) missing (net.3.bias)"),
        (("model", mask_key), torch.ones_like(state["model"][mask_key]),
         "the mask of layer 'net.3' is not a 2:4 mask in layout 'channels'"),
        (("optimizer",), bad_opt, "its optimizer state does not fit: momentum_buffer of parameter"),
        (("optimizer", "param_groups"), [], "its optimizer state does not fit: other parameter groups"),
        (("sad", "initial"), {}, "its SAD initial masks do not fit: 1 tensor(s) missing"),
        (("rng", "torch"), torch.zeros(3, dtype=torch.uint8), "its torch RNG state is damaged"),
        (("rng", "python"), [3, [1, 2], None], "its Python RNG state is damaged"),
        (("epoch",), 5, "it records epoch 5 of 2 with 1 per-epoch record(s), which do not fit"),
        (("config", "colour"), "red", "records a training config this version cannot read (unknown TrainConfig"),
    ]
    for i, (path, value, problem) in enumerate(cases):
        folder = _copy_run(run, tmp_path / str(i))
        edited = _edited(state, path, value)
        if path[0] != "config":  # a run of 2 epochs with 1 done: same settings as the resumed one
            edited["config"] = dict(edited["config"], epochs=2)
        ckpt.save(folder / "checkpoint.pt", edited)
        _resume_fails(folder, problem)


# --- the CLIs --------------------------------------------------------------------------------

def test_train_cli_resume_truncated_checkpoint_one_line_exit_2(tmp_path, run):
    """The reported defect, end to end in a fresh interpreter: no traceback, one line, exit 2."""
    folder = _copy_run(run, tmp_path / "r")
    good = (run / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    before = _snapshot(folder)
    cmd = [sys.executable, "-m", "nmsparse", "train", "--data", "digits", "--model", "mlp", "--epochs", "2",
           "--train-subset", "128", "--test-subset", "50", "--batch-size", "64", "--lr", "0.05", "--threads", "1",
           "--out", str(folder), "--resume"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    assert res.stderr == (f"nmsparse train: error: cannot resume from {folder / 'checkpoint.pt'}: is truncated or "
                          "corrupted (not a complete torch.save zip archive); restore it, or start the run afresh "
                          "with --overwrite instead of --resume\n")
    assert _snapshot(folder) == before


def test_train_cli_other_nm_one_line_exit_2(tmp_path, run, capsys):
    folder = _copy_run(run, tmp_path / "r")
    before = _snapshot(folder)
    args = ["train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--train-subset", "128",
            "--test-subset", "50", "--batch-size", "64", "--lr", "0.05", "--threads", "1", "--out", str(folder),
            "--resume", "--nm", "4:8", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nmsparse train: error: cannot resume from ")
    assert "was made with other settings (nm='2:4', now '4:8')" in err
    assert _snapshot(folder) == before


def _prune(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--checkpoint", str(checkpoint), "--out", str(out), "--method", "magnitude",
            "--calib-samples", "10", "--test-subset", "20", "--no-progress", *extra]


def test_prune_cli_damaged_checkpoints(tmp_path, run, capsys):
    good = (run / "final.safetensors").read_bytes()
    hint = "; pass the final.safetensors written by 'nmsparse train' or 'nmsparse prune'"
    for name, (data, problem) in _damaged_safetensors_files(good, (run / "checkpoint.pt").read_bytes()).items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        assert main(_prune(p, tmp_path / "o")) == 2, name
        err = capsys.readouterr().err
        assert err == f"nmsparse prune: error: cannot load {p}: {problem}{hint}\n" or (
            problem.endswith("file") and err.startswith(f"nmsparse prune: error: cannot load {p}: {problem}")), err
    assert main(_prune(tmp_path, tmp_path / "o")) == 2
    assert f"cannot load {tmp_path}: is a directory, not a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prune_cli_damaged_recorded_config(tmp_path, run, capsys):
    tensors, _ = read_safetensors(run / "final.safetensors")
    for name, meta, problem in [
        ("torn", '{"model": "mlp", "da', "its recorded training config (metadata 'config') is not valid JSON"),
        ("list", '["mlp"]', "its recorded training config (metadata 'config') is a list, not a JSON object"),
    ]:
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(p), metadata=checksum.sign(tensors, {"config": meta}))  # damaged when written
        assert main(_prune(p, tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot load {p}: {problem}" in err
        assert err.rstrip().endswith("the file is damaged: write it again, or pass a good copy")
    assert not (tmp_path / "o").exists()


def test_prune_cli_another_models_weights(tmp_path, run, capsys):
    assert main(_prune(run / "final.safetensors", tmp_path / "o", "--model", "resnet")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (f"cannot load {run / 'final.safetensors'}: does not fit model 'resnet' on 'digits' (" in err
            and "tensor(s) missing (conv1.weight" in err and "unexpected (net.1.bias" in err)
    assert err.rstrip().endswith("it records model 'mlp' on 'digits'; pass the --model and --data it was trained with")
    # a file whose names match but whose shapes do not (another input size): found before loading
    tensors, meta = read_safetensors(run / "final.safetensors")
    tensors["net.1.weight"] = torch.zeros(256, 100)
    p = tmp_path / "shape.safetensors"
    save_file(tensors, str(p), metadata=checksum.sign(tensors, meta))
    assert main(_prune(p, tmp_path / "o")) == 2
    assert "1 with another shape (net.1.weight (256, 100) in the file, (256, 64) in the model)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- nmsparse reproduce ----------------------------------------------------------------------

def _grid(tmp_path):
    from nmsparse.reproduce import grid as G

    scale = G.Scale(epochs=1, seeds=(0,), train_subset=64, test_subset=32, data="digits", threads=1)
    return scale, G.demo_cells(scale)


def test_reproduce_refuses_a_damaged_checkpoint_before_writing(tmp_path, run):
    from nmsparse.reproduce.runner import cell_config, run_dir, run_grid

    scale, cells = _grid(tmp_path)
    out = tmp_path / "g"
    d = run_dir(out, cells[1])
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cell_config(cells[1], scale, out)))
    (d / "metrics.jsonl").write_text("")
    (d / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000])
    before = _snapshot(out)
    with pytest.raises(LoadError) as e:
        run_grid(cells, scale, out, experiments=["demo"], log=lambda s: None)
    _one_line(e.value, d / "checkpoint.pt", "cannot resume from", "is truncated or corrupted",
              "; delete the run's folder to train it again from the start")
    assert _snapshot(out) == before  # no grid.json, no invocations.jsonl, the first cell not trained
    # the same run's checkpoint, from other settings (another N:M): also refused up front
    state = ckpt.load(run / "checkpoint.pt")
    ckpt.save(d / "checkpoint.pt", dict(state, config=dict(TrainConfig.from_dict(
        cell_config(cells[1], scale, out)).to_dict(), nm="4:8")))
    with pytest.raises(LoadError, match="was made with other settings .*nm='4:8', now '2:4'"):
        run_grid(cells, scale, out, experiments=["demo"], log=lambda s: None)
    # a damaged config.json of a run
    (d / "config.json").write_text('{"model": "res')
    with pytest.raises(LoadError, match="config.json: is not valid JSON .*delete the run's folder"):
        run_grid(cells, scale, out, experiments=["demo"], log=lambda s: None)


def test_reproduce_cli_damaged_grid_json(tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    assert main(["reproduce", "--report-only", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"nmsparse reproduce: error: {out} holds no grid (no grid.json): run "
                                       f"`nmsparse reproduce --out {out}` first\n")
    for data, problem in [(b"\xff\xfe\x00garbage", "is not a text file (invalid UTF-8)"),
                          (b'{"scale": {', "is not valid JSON"),
                          (b"[1, 2]", "holds a JSON list, not an nmsparse reproduce grid manifest"),
                          (b'{"scale": {}}', "is not a complete nmsparse reproduce grid manifest (scale, cells")]:
        (out / "grid.json").write_bytes(data)
        for args in (["--report-only", "--report-dir", str(tmp_path / "rep")],
                     ["--demo", "--epochs", "1", "--train-subset", "64"]):
            assert main(["reproduce", *args, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"cannot load {out / 'grid.json'}: {problem}" in err, err
            assert err.rstrip().endswith("; delete it (finished runs in OUT/runs are picked up again) or use "
                                         "another --out")
    assert sorted(p.name for p in out.iterdir()) == ["grid.json"]  # nothing trained, nothing written
    assert not (tmp_path / "rep").exists()


def test_reproduce_reads_damaged_metrics_up_to_the_damage(tmp_path):
    from nmsparse.reproduce.runner import read_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"epoch": 1}\n{"epoch": 2}\n\xff\xfe garbage\n{"epoch": 3}\n')
    assert read_metrics(p) == [{"epoch": 1}, {"epoch": 2}]
    p.write_bytes(b'{"epoch": 1}\n[1, 2]\n')
    assert read_metrics(tmp_path) == [{"epoch": 1}]


def test_load_errors_survive_pickling():
    """multiprocessing hands exceptions between processes by pickling them: message and fields kept."""
    import pickle

    from nmsparse.plumbing.errors import LoadError
    from nmsparse.export.files import FormatError

    for err in (LoadError("run/x.pt", "is truncated", "train again", action="cannot resume from"),
                FormatError("m.nms: header names no tensors", path="m.nms")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert (back.path, back.problem, back.hint, back.action) == (err.path, err.problem, err.hint, err.action)
