"""Writing files whole or not at all, with one-line errors that name the user's path.

* :func:`atomic_write` writes a file through a temporary file beside it (``.NAME.HOST.PID-XXXX.tmp``),
  flushed to disk, then ``os.replace``-d over the target: a crash or a full disk leaves the previous
  file intact. Any failure (disk full, read-only file system, no permission, ...) raises
  :class:`~nmsparse.plumbing.errors.WriteError` naming ``path`` (never the temporary name) and the cause, and
  the temporary file is removed.
* :func:`remove_stale` removes the temporary files and folders of writers that were killed (their
  process id no longer runs); :func:`atomic_write` and :func:`staging_dir` call it on their folder.
* :func:`write_safetensors` streams a safetensors file (the format's spec: 8-byte little-endian
  header length, JSON header padded with spaces to a multiple of 8, then the tensors' bytes
  back to back) to a file object: no in-memory copy of the whole file and no hidden temporary file
  of its own, so a write error surfaces as the ``OSError`` it is.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

import torch

from nmsparse.plumbing.errors import WriteError

# .NAME.HOST.PID-TOKEN.tmp (files) and .NAME.HOST.PID-TOKEN.tmpdir (folders); older nmsparse versions
# wrote .NAME.XXXXXXXX.tmp (no process id) and .nmsparse-export.XXXXXXXX/ folders. The host name keeps
# a process id from being judged on another machine (or container) sharing the folder.
_OURS = re.compile(r"^\..+\.([A-Za-z0-9-]{1,32})\.(\d+)-[0-9a-f]{8}\.tmp(dir)?$")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_LEGACY = re.compile(r"^(\..+\.[A-Za-z0-9_]{8}\.tmp|\.nmsparse-export\.[A-Za-z0-9_]{8})$")
# A legacy temporary name (no process id) is removed once it is this old.
LEGACY_AGE_S = 3600.0

_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the file system",
           errno.ENOENT: "its folder does not exist", errno.ENOTDIR: "a part of the path is not a folder",
           errno.EISDIR: "it is a folder"}

# The errnos of a failed write (as opposed to a bad input file).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError:
    """The :class:`WriteError` for ``path`` of a failed write that raised ``e``."""
    if isinstance(e, WriteError):
        return e
    code = getattr(e, "errno", None)
    cause = _CAUSES.get(code) if code is not None else None
    if cause is None:
        text = str(getattr(e, "strerror", None) or e).strip().splitlines()
        cause = text[0] if text else type(e).__name__
    return WriteError(path, cause, code)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files/folders in ``folder`` left by nmsparse writers that were killed:
    names of this module's pattern from this host whose process is gone; those of another host and
    older versions' names (without a process id) once unmodified for ``LEGACY_AGE_S``. Returns the
    names removed; never raises."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        m = _OURS.match(e.name)
        try:
            if m and m.group(1) == _HOST:
                stale = not _alive(int(m.group(2)))
            elif m or _LEGACY.match(e.name):  # another host's, or no process id: by age
                stale = now - e.stat(follow_symlinks=False).st_mtime > LEGACY_AGE_S
            else:
                continue
            if not stale:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(e.name)
        except OSError:
            continue
    return removed


def temp_path(path: str | os.PathLike, folder: bool = False) -> Path:
    """A fresh temporary name beside ``path`` that :func:`remove_stale` recognises."""
    path = Path(path)
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}-{secrets.token_hex(4)}.tmp{'dir' if folder else ''}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Stream:
    """A write-only file object around ``f`` without ``fileno``: ``torch.save`` then writes through
    Python (its ``OSError`` keeps the errno) instead of its own C++ writer (an opaque RuntimeError)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def write(self, b) -> int:
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename over it.

    Raises :class:`~nmsparse.plumbing.errors.WriteError` naming ``path`` on any ``OSError`` (the temporary file
    is removed and the previous ``path``, if any, left as it was); other exceptions of ``write``
    propagate unchanged, also with the temporary file removed."""
    path = Path(path)
    remove_stale(path.parent)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(_Stream(f))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = os_cause(e)
        if cause is not None:
            raise write_error(path, cause) from e
        raise



def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) into ``path`` whole or not at all (:func:`atomic_write`; ``WriteError`` naming it)."""
    atomic_write(path, lambda f: f.write(text.encode()))

def os_cause(e: BaseException) -> OSError | None:
    """``e`` if an ``OSError``, else the ``OSError`` it was raised while handling (torch.save's zip
    writer replaces a failed write by a RuntimeError from its ``__exit__``), else ``None``."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def staging_dir(out: str | os.PathLike) -> Path:
    """A new temporary folder *inside* folder ``out`` (created, with its parents, if needed) for
    files that are moved into ``out`` when complete; stale ones of killed writers are removed first.
    Raises :class:`WriteError` naming ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = temp_path(out / "nmsparse-staging", folder=True)
        tmp.mkdir()
    except OSError as e:
        raise write_error(out, e) from e
    return tmp


# safetensors dtype names (the format's spec)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def write_safetensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU or not; copied to CPU one at a time) and ``metadata`` (str -> str) to the
    binary file object ``f`` as a safetensors file, tensors in the order given."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors by nmsparse")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for t in tensors.values():
        if t.numel():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None, *, sign: bool = True) -> None:
    """Write a safetensors file at ``path`` atomically (:func:`atomic_write`), with the nmsparse
    checksum (:func:`nmsparse.plumbing.checksum.sign`) in its metadata unless ``sign=False``."""
    from nmsparse.plumbing import checksum

    meta = checksum.sign(tensors, metadata) if sign else dict(metadata or {})
    atomic_write(path, lambda f: write_safetensors(f, tensors, meta))


__all__ = ["LEGACY_AGE_S", "WRITE_ERRNOS", "atomic_write", "remove_stale", "save_safetensors", "staging_dir", "temp_path",
           "os_cause", "write_error", "write_safetensors"]
