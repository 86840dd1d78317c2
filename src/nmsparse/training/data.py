"""Datasets as in-memory tensors: Fashion-MNIST from IDX files and scikit-learn's ``digits``.

Nothing here downloads anything. Fashion-MNIST is read from the IDX files of Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), or from ``data_dir``, or
from ``$NMSPARSE_DATA``; each file may be gzipped (``.gz``) or plain. Magic numbers, dimensions and
sizes are checked, and a missing or truncated file raises :class:`DataError` with a message saying
what to do.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "digits")
INSTALL_HINT = "install it with 'sudo apt-get install -y dataset-fashion-mnist' (or 'make install')"

# IDX: magic = 0x00000800 | type code (0x08 = unsigned byte) << 0, low byte = number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

FASHION_FILES = {
    "train_images": ("train-images-idx3-ubyte", IMAGES_MAGIC, (60000, 28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", LABELS_MAGIC, (60000,)),
    "test_images": ("t10k-images-idx3-ubyte", IMAGES_MAGIC, (10000, 28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", LABELS_MAGIC, (10000,)),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class DataError(ValueError):
    """A dataset file is missing, truncated or not what it claims to be."""


@dataclasses.dataclass
class Dataset:
    """Normalised images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64, split in train and test."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]


def default_data_dir() -> str:
    """``$NMSPARSE_DATA`` when set, else Debian's Fashion-MNIST folder."""
    return os.environ.get("NMSPARSE_DATA") or DEFAULT_DIR


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        p = data_dir / name
        if p.is_file():
            return p
    if not data_dir.is_dir():
        raise DataError(f"Fashion-MNIST folder {data_dir} does not exist; {INSTALL_HINT}, "
                        "or point --data-dir / $NMSPARSE_DATA at a folder holding the IDX files")
    raise DataError(f"Fashion-MNIST file {stem}[.gz] is missing from {data_dir}; {INSTALL_HINT}, "
                    "or point --data-dir / $NMSPARSE_DATA at a folder holding the IDX files")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"cannot read {path}: {e} (truncated or corrupt download? reinstall the data)") from e


def read_idx(path: str | os.PathLike, magic: int | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped or not) into a uint8 array.

    ``magic`` and ``shape``, when given, are checked against the header; the payload must hold
    exactly the number of bytes the header announces.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, not even an IDX header")
    (got_magic,) = struct.unpack(">I", raw[:4])
    if magic is not None and got_magic != magic:
        raise DataError(f"{path}: magic number 0x{got_magic:08x}, expected 0x{magic:08x}; not the right IDX file")
    if got_magic >> 8 != 0x08:
        raise DataError(f"{path}: magic number 0x{got_magic:08x} is not an IDX file of unsigned bytes")
    ndim = got_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, header needs {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if shape is not None and tuple(dims) != tuple(shape):
        raise DataError(f"{path}: dimensions {dims}, expected {tuple(shape)}")
    size = int(np.prod(dims)) if dims else 0
    if len(raw) - header != size:
        what = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw) - header} data bytes, header says {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST, normalised with its training mean and std; x is ``(N, 1, 28, 28)``."""
    d = Path(data_dir) if data_dir is not None else Path(default_data_dir())
    arrays = {k: read_idx(_find(d, stem), magic, shape) for k, (stem, magic, shape) in FASHION_FILES.items()}
    for split in ("train", "test"):
        bad = int((arrays[f"{split}_labels"] > 9).sum())
        if bad:
            raise DataError(f"{d}: {bad} {split} labels outside 0..9; not Fashion-MNIST")

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.copy()).unsqueeze(1).float().div_(255.0)
        return x.sub_(FASHION_MEAN).div_(FASHION_STD)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset("fashion-mnist", images(arrays["train_images"]), labels(arrays["train_labels"]),
                   images(arrays["test_images"]), labels(arrays["test_labels"]))


def load_digits() -> Dataset:
    """scikit-learn's ``digits`` (1797 8x8 images, bundled with scikit-learn): a fixed 80/20 split
    (independent of the training seed), x ``(N, 1, 8, 8)`` scaled to [0, 1] then centred."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return Dataset("digits", x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous())


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, train_subset: int | None = None,
                 test_subset: int | None = None) -> Dataset:
    """Load ``name`` ("fashion-mnist" or "digits"); keep only the first ``train_subset`` /
    ``test_subset`` images when given."""
    if name == "fashion-mnist":
        ds = load_fashion_mnist(data_dir)
    elif name == "digits":
        ds = load_digits()
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if train_subset is not None:
        ds.x_train, ds.y_train = ds.x_train[:train_subset], ds.y_train[:train_subset]
    if test_subset is not None:
        ds.x_test, ds.y_test = ds.x_test[:test_subset], ds.y_test[:test_subset]
    return ds
