"""The dataset loaders: IDX parsing and its checks, Fashion-MNIST, digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nmsparse.training import data as D


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x00000800 | arr.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _fake_fashion(d: Path, gz: bool = True) -> None:
    """A full-size Fashion-MNIST folder of synthetic images (labels i % 10, pixels i % 256)."""
    d.mkdir(parents=True, exist_ok=True)
    for stem, _, shape in D.FASHION_FILES.values():
        n = shape[0]
        if len(shape) == 1:
            arr = (np.arange(n) % 10).astype(np.uint8)
        else:
            arr = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None], shape)
        _write(d / stem, _idx_bytes(np.ascontiguousarray(arr)), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = _write(tmp_path / "x-idx3-ubyte", _idx_bytes(arr), gz)
    out = D.read_idx(p, D.IMAGES_MAGIC, (2, 3, 4))
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_read_idx_wrong_magic(tmp_path):
    p = _write(tmp_path / "y", _idx_bytes(np.zeros(5, np.uint8)), gz=False)
    with pytest.raises(D.DataError, match="magic number 0x00000801, expected 0x00000803"):
        D.read_idx(p, D.IMAGES_MAGIC)


def test_read_idx_not_ubyte(tmp_path):
    p = tmp_path / "y"
    p.write_bytes(struct.pack(">II", 0x00000D01, 1) + b"\0\0\0\0")  # float32 IDX
    with pytest.raises(D.DataError, match="not an IDX file of unsigned bytes"):
        D.read_idx(p)


def test_read_idx_wrong_shape(tmp_path):
    p = _write(tmp_path / "x", _idx_bytes(np.zeros((3, 2, 2), np.uint8)), gz=False)
    with pytest.raises(D.DataError, match=r"dimensions \(3, 2, 2\), expected \(3, 28, 28\)"):
        D.read_idx(p, D.IMAGES_MAGIC, (3, 28, 28))


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_read_idx_truncated_plain(tmp_path, cut):
    payload = _idx_bytes(np.zeros((4, 5, 5), np.uint8))
    p = _write(tmp_path / "x", payload[:-cut] if cut < 100 else payload[:6], gz=False)
    with pytest.raises(D.DataError, match="truncated"):
        D.read_idx(p, D.IMAGES_MAGIC)


def test_read_idx_too_long(tmp_path):
    p = _write(tmp_path / "x", _idx_bytes(np.zeros(5, np.uint8)) + b"\0", gz=False)
    with pytest.raises(D.DataError, match="longer than its header says"):
        D.read_idx(p)


def test_read_idx_truncated_gzip(tmp_path):
    rng = np.random.default_rng(0)
    p = _write(tmp_path / "x", _idx_bytes(rng.integers(0, 256, (50, 28, 28))), gz=True)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataError, match="cannot read .*truncated or corrupt"):
        D.read_idx(p)


def test_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(D.DataError, match="does not exist.*apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist(tmp_path / "nope")


def test_missing_file_is_named(tmp_path):
    _fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] is missing"):
        D.load_fashion_mnist(tmp_path)


def test_truncated_fashion_file(tmp_path):
    _fake_fashion(tmp_path, gz=False)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(D.DataError, match="train-labels-idx1-ubyte is truncated: 59999 data bytes"):
        D.load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_fake_fashion_loads_from_env(tmp_path, monkeypatch, gz):
    _fake_fashion(tmp_path, gz=gz)
    monkeypatch.setenv("NMSPARSE_DATA", str(tmp_path))
    ds = D.load_dataset("fashion-mnist", train_subset=100, test_subset=50)
    assert ds.x_train.shape == (100, 1, 28, 28) and ds.x_test.shape == (50, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train[:12].tolist() == [i % 10 for i in range(12)]
    expected = (3 / 255 - D.FASHION_MEAN) / D.FASHION_STD
    assert torch.allclose(ds.x_train[3], torch.full((1, 28, 28), expected))


def test_default_dir_follows_env(monkeypatch):
    monkeypatch.delenv("NMSPARSE_DATA", raising=False)
    assert D.default_data_dir() == D.DEFAULT_DIR
    monkeypatch.setenv("NMSPARSE_DATA", "/x/y")
    assert D.default_data_dir() == "/x/y"


@pytest.mark.skipif(not Path(D.DEFAULT_DIR).is_dir(), reason="Fashion-MNIST not installed (make install)")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("NMSPARSE_DATA", raising=False)
    ds = D.load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(float(ds.x_train.mean())) < 1e-3 and abs(float(ds.x_train.std()) - 1) < 1e-3


def test_digits_fixed_split():
    a, b = D.load_dataset("digits"), D.load_dataset("digits", train_subset=10)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(a.x_train[:10], b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.image_size == 8 and a.in_channels == 1 and a.num_classes == 10


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        D.load_dataset("mnist")
