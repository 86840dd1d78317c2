"""The safetensors files of a Hugging Face model folder, read lazily: which file holds which tensor,
and each tensor's dtype and shape from the headers alone (no tensor data is read).

A folder holds either ``model.safetensors`` or a ``model.safetensors.index.json`` whose ``weight_map``
names the shard of every tensor. A missing or unreadable shard, an index that names a file that is not
there or a tensor that its shard lacks, and a truncated or corrupted file all raise
:class:`~nmsparse.export.FormatError` naming the file (and the tensor). A file that carries nmsparse's
checksum (:mod:`nmsparse.plumbing.checksum`: every file :func:`~nmsparse.integrations.compressed_tensors.save`
writes) has its metadata and tensor names checked with the header and every tensor checked as it is read;
files written by other programs (compressed-tensors itself) carry none and are read as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nmsparse.plumbing import checksum
from nmsparse.plumbing.errors import LoadError
from nmsparse.export.files import FormatError
from nmsparse.plumbing.io import _safetensors_problem

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"

_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


@dataclass(frozen=True)
class Entry:
    """One stored tensor: its file, dtype and shape (from the header)."""

    file: Path
    dtype: torch.dtype | str
    shape: tuple[int, ...]
    record: checksum.Record | None = field(default=None, compare=False)  # the file's checksum, if it has one


def fail(path: object, problem: str) -> FormatError:
    """A :class:`FormatError` whose message starts with ``path``."""
    return FormatError(f"{path}: {problem}", path=str(path))


def file_header(path: Path) -> dict[str, Entry]:
    """Every tensor of one safetensors file with its dtype and shape (headers only)."""
    from safetensors import safe_open

    if not path.is_file():
        raise fail(path, "not found (a weight file of the folder is missing)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
            slices = {k: f.get_slice(k) for k in keys}
            out = {k: (_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape())) for k, sl in slices.items()}
    except OSError as e:
        raise fail(path, f"cannot be read ({e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise fail(path, _safetensors_problem(path, e)) from None
    try:
        record = checksum.recorded(path, metadata)
        if record is not None:
            record.check_metadata(metadata)
            record.check_names(keys)
    except LoadError as e:
        raise fail(path, f"{e.problem}; {e.hint}" if e.hint else e.problem) from None
    return {k: Entry(path, dt, shape, record) for k, (dt, shape) in out.items()}


def weight_map(folder: Path) -> dict[str, Entry]:
    """Every tensor of the folder's weights, by name (index checked against the shards' headers)."""
    single, index = folder / SINGLE, folder / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError("'weight_map' is not an object of file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise fail(index, f"is not a readable index ({type(e).__name__}: {e})") from None
        out: dict[str, Entry] = {}
        for fname in sorted(set(wm.values())):
            shard = folder / fname
            if not shard.is_file():
                first = next(k for k, v in wm.items() if v == fname)
                raise fail(index, f"names shard {fname!r} (holding {first!r}), which is not in the folder")
            header = file_header(shard)
            for k in (k for k, v in wm.items() if v == fname):
                if k not in header:
                    raise fail(shard, f"lacks tensor {k!r}, which the index places there")
                out[k] = header[k]
        return out
    if single.is_file():
        return file_header(single)
    raise fail(folder, f"holds no {SINGLE} (nor {INDEX})")


def read_tensor(entry: Entry, name: str) -> torch.Tensor:
    """One tensor's data (``FormatError`` naming it and its file when the bytes cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(entry.file), framework="pt") as f:
            t = f.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - a file changed or damaged since its header was read
        raise fail(entry.file, f"tensor {name!r} cannot be read ({type(e).__name__}: {e})") from None
    if entry.record is not None:
        try:
            entry.record.check(name, t)
        except LoadError as e:
            raise fail(entry.file, f"{e.problem}; {e.hint}" if e.hint else e.problem) from None
    return t
