"""Reading files without tracebacks: every failure becomes one :class:`~nmsparse.plumbing.errors.LoadError`.

Each reader turns the OS's, PyTorch's, safetensors' and json's exceptions into a one-line message that
names the file and the problem (missing, a directory, unreadable, empty, truncated, corrupted, not
that format, refused because it holds code); callers add what the user should do with
:meth:`LoadError.with_hint`. No reader runs code from a file: :func:`read_torch` uses
``torch.load(weights_only=True)``, :func:`read_safetensors` the safetensors parser, which checks the
header against the file (offsets, shapes, dtypes, length) before any tensor is built.

:func:`check_state_dict` compares a loaded state dict with a model's (names, shapes) and raises
before the model is touched, unlike ``nn.Module.load_state_dict``, which copies every tensor that fits
before reporting the ones that do not.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from nmsparse.plumbing import checksum
from nmsparse.plumbing.errors import LoadError

# How many names a mismatch message lists before "and K more".
_SHOW = 3


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0].strip()


def _os_problem(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, PermissionError):
        return "cannot be read (permission denied)"
    return f"cannot be read ({e.strerror or _first_line(e)})"


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path` if it is a readable regular file (``LoadError`` otherwise)."""
    p = Path(path)
    try:
        if p.is_dir():
            raise LoadError(p, "is a directory, not a file")
        if not p.exists():
            raise LoadError(p, "not found")
        if not p.is_file():
            raise LoadError(p, "is not a regular file")
        with p.open("rb"):
            pass
    except OSError as e:
        raise LoadError(p, _os_problem(e)) from e
    return p


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError as e:
        raise LoadError(p, _os_problem(e)) from e


def _head(p: Path, k: int = 4) -> bytes:
    try:
        with p.open("rb") as f:
            return f.read(k)
    except OSError:
        return b""


def read_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    Raises :class:`LoadError` for a missing, unreadable, empty, truncated or corrupted file, a file
    that is not a ``torch.save`` archive, and one that holds Python objects other than tensors and
    plain data (loading those could run code, so they are refused).
    """
    p = check_file(path)
    if _size(p) == 0:
        raise LoadError(p, "is empty (0 bytes)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise LoadError(p, _os_problem(e)) from e
    except OSError as e:  # the file was readable: PyTorch's reader failing on a damaged archive
        if _head(p, 2) == b"PK":
            raise LoadError(p, "is truncated or corrupted (not a complete torch.save zip archive)") from e
        raise LoadError(p, _os_problem(e)) from e
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "Unsupported class" in text or "GLOBAL" in text:
            raise LoadError(p, "holds Python objects other than tensors and plain data, refused "
                               "(loading them could run code from the file)") from e
        if _head(p, 8).startswith(b"PK"):
            raise LoadError(p, "is corrupted (a torch.save archive whose contents cannot be decoded)") from e
        raise LoadError(p, "is not a PyTorch checkpoint (torch.save) file") from e
    except RuntimeError as e:
        text = str(e)
        if "zip archive" in text or "central directory" in text:
            raise LoadError(p, "is truncated or corrupted (not a complete torch.save zip archive)") from e
        raise LoadError(p, f"is corrupted ({_first_line(e)})") from e
    except EOFError as e:
        raise LoadError(p, "is truncated (ends before its data does)") from e
    except Exception as e:  # noqa: BLE001 - any other decoding failure of a damaged file
        raise LoadError(p, f"is corrupted ({type(e).__name__}: {_first_line(e)})") from e


_SAFETENSORS_PROBLEMS = (
    ("header too small", "is too short to be a safetensors file (truncated)"),
    ("invalid header length", "is truncated (shorter than the header length its first 8 bytes give)"),
    ("header too large", "is not a safetensors file (its first 8 bytes do not give a plausible header length)"),
    ("incomplete metadata", "is truncated or has bytes its header does not account for"),
    ("invalid shape, data type, or offset", "has a header that does not match its data "
                                            "(a tensor's shape, dtype or byte offsets are wrong)"),
    ("invalid json", "has a corrupted header (not valid safetensors JSON)"),
    ("metadata incomplete buffer", "is truncated or has bytes its header does not account for"),
)


def _safetensors_problem(p: Path, e: Exception) -> str:
    if _head(p, 2) == b"PK":
        return "is a torch.save archive (e.g. checkpoint.pt), not a safetensors file"
    text = _first_line(e).lower()
    for key, problem in _SAFETENSORS_PROBLEMS:
        if key in text:
            return problem
    return f"is not a readable safetensors file ({_first_line(e)})"


def read_safetensors(path: str | os.PathLike, device: str = "cpu", *,
                     note: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (``metadata`` is ``{}`` when it has none).

    Raises :class:`LoadError` for a missing, unreadable, empty, truncated or corrupted file, a file in
    another format, a header that lies about its data (shapes, dtypes or offsets that do not match
    the bytes, checked by the safetensors parser before any tensor is built), and a file whose
    nmsparse checksum (:mod:`nmsparse.plumbing.checksum`) does not match, naming the first bad tensor. A file
    without a checksum loads unverified, with an ``UnverifiedFileWarning`` when ``note``.
    """
    from safetensors import safe_open

    p = check_file(path)
    if _size(p) == 0:
        raise LoadError(p, "is empty (0 bytes)")
    try:
        with safe_open(str(p), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise LoadError(p, _os_problem(e)) from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and others)
        raise LoadError(p, _safetensors_problem(p, e)) from e
    checksum.verify(p, tensors, metadata, note=note)
    return tensors, metadata


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path`` (``LoadError`` for a missing, unreadable, empty or invalid file)."""
    p = check_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise LoadError(p, _os_problem(e)) from e
    except UnicodeDecodeError as e:
        raise LoadError(p, "is not a text file (invalid UTF-8)") from e
    if not text.strip():
        raise LoadError(p, "is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(p, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any]) -> str | None:
    """Why ``found`` cannot be loaded where ``expected`` (e.g. ``model.state_dict()``) is, or ``None``.

    Compares names, that every value is a tensor, and shapes (dtypes may differ: loading converts).
    """
    if not isinstance(found, Mapping):
        return f"it holds a {type(found).__name__} instead of a dict of tensors"
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    not_tensor = [k for k in expected if k in found and not isinstance(found[k], torch.Tensor)]
    shape = [k for k in expected if k in found and isinstance(found[k], torch.Tensor)
             and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if not_tensor:
        parts.append(f"{len(not_tensor)} not a tensor ({_names(not_tensor)})")
    if shape:
        shown = ", ".join(f"{k} {tuple(found[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                          for k in shape[:_SHOW])
        more = f" and {len(shape) - _SHOW} more" if len(shape) > _SHOW else ""
        parts.append(f"{len(shape)} with another shape ({shown}{more})")
    return "; ".join(parts) or None


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], path: str | os.PathLike, *,
                     what: str = "the model", hint: str | None = None) -> None:
    """Raise :class:`LoadError` naming ``path`` when ``found`` does not fit ``expected`` (see
    :func:`state_dict_mismatch`); nothing is loaded either way."""
    why = state_dict_mismatch(expected, found)
    if why:
        raise LoadError(path, f"does not fit {what}: {why}", hint)


__all__ = ["check_file", "check_state_dict", "read_json", "read_safetensors", "read_torch", "state_dict_mismatch"]
