"""Checksums of the safetensors files nmsparse writes, verified by every nmsparse reader.

A writer calls :func:`sign` on the tensors and metadata it is about to save; the result is the
metadata plus one entry, ``KEY`` (``"nmsparse_checksum"``), a JSON object::

    {"algorithm": "sha256", "tensors": {name: hex, ...}, "metadata": hex}

``tensors`` holds, per tensor in the order written, the SHA-256 of its dtype, shape and bytes (see
:func:`tensor_digest`); ``metadata`` the SHA-256 of every other metadata entry. A reader calls
:func:`verify` (all tensors at once) or :func:`recorded` then :meth:`Record.check` per tensor as it
reads them (for readers that keep one tensor in memory at a time). Any difference -- a changed bit in
a tensor or in the metadata, a tensor added, dropped or renamed, two tensors' byte ranges swapped in
the header -- raises :class:`~nmsparse.plumbing.errors.LoadError` naming the file and the first bad tensor.

A file without ``KEY`` (written before checksums existed, or by another program) loads unverified:
:func:`verify` then issues an :class:`UnverifiedFileWarning` when asked to (``note=True``, for files
that claim to be nmsparse's own); :func:`cli_notes` prints those as one ``note:`` line in a CLI.

Hashing releases the GIL, so the tensors of a file are hashed on several threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from nmsparse.plumbing.errors import LoadError

KEY = "nmsparse_checksum"
ALGORITHM = "sha256"
# The first characters of every record: a record found under another key means the key was damaged.
_SIGNATURE = '{"algorithm": "sha256"'
# Below this many bytes in all, hashing on one thread is as fast as starting a pool.
_PARALLEL_MIN_BYTES = 8 << 20
DAMAGED_HINT = "the file is damaged: write it again, or use a good copy"


class UnverifiedFileWarning(UserWarning):
    """A file nmsparse reads carries no checksum (written before checksums existed): loaded unverified."""


def _bytes(t: torch.Tensor):
    """A read-only byte view of ``t`` (a copy only if it is not a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of ``t``'s dtype, shape and bytes (in memory order of a contiguous copy).

    Equal for equal tensors on any device, and after a safetensors save/load round trip."""
    h = hashlib.sha256(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}:".encode())
    h.update(_bytes(t))
    return h.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """SHA-256 (hex) of every metadata entry but ``KEY`` (order does not matter)."""
    items = sorted((k, v) for k, v in metadata.items() if k != KEY)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    workers = min(len(names), os.cpu_count() or 1, 8)
    if workers < 2 or total < _PARALLEL_MIN_BYTES:
        return {k: tensor_digest(tensors[k]) for k in names}
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
        return dict(zip(names, pool.map(tensor_digest, (tensors[k] for k in names))))


def sign(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """``metadata`` (a new dict) plus the checksum entry ``KEY`` of ``tensors`` and ``metadata``.

    Pass the result as the ``metadata`` of ``safetensors.torch.save_file``/``save`` with the same
    ``tensors``. Metadata values must be strings (safetensors' rule)."""
    meta = {k: v for k, v in (metadata or {}).items() if k != KEY}
    record = {"algorithm": ALGORITHM, "tensors": _digests(tensors), "metadata": metadata_digest(meta)}
    meta[KEY] = json.dumps(record)
    return meta


@dataclass
class Record:
    """The checksum entry of a file at ``path``: expected digest per tensor name, and of the metadata."""

    path: str
    tensors: dict[str, str]
    metadata: str

    def check_names(self, names) -> None:
        """Raise ``LoadError`` if the file's tensor ``names`` differ from those recorded."""
        names = list(names)
        extra = [k for k in names if k not in self.tensors]
        if extra:
            raise LoadError(self.path, f"fails its checksum: tensor {extra[0]!r} is not among those recorded "
                                       "when it was written", DAMAGED_HINT)
        have = set(names)
        missing = [k for k in self.tensors if k not in have]
        if missing:
            raise LoadError(self.path, f"fails its checksum: tensor {missing[0]!r} recorded when it was "
                                       "written is missing", DAMAGED_HINT)

    def check_metadata(self, metadata: Mapping[str, str]) -> None:
        """Raise ``LoadError`` if the metadata differs from what was written."""
        if metadata_digest(metadata) != self.metadata:
            raise LoadError(self.path, "fails its checksum: its metadata differs from what was written",
                            DAMAGED_HINT)

    def check(self, name: str, tensor: torch.Tensor, digest: str | None = None) -> None:
        """Raise ``LoadError`` naming ``name`` if ``tensor`` differs from what was written."""
        if name not in self.tensors:
            self.check_names([name])
        if (digest or tensor_digest(tensor)) != self.tensors[name]:
            raise LoadError(self.path, f"fails its checksum: tensor {name!r} differs from what was written "
                                       f"({tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')})",
                            DAMAGED_HINT)

    def check_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """:meth:`check_names` then :meth:`check` of every tensor (hashed on several threads); the
        first bad tensor in the order written is named."""
        self.check_names(tensors)
        ordered = {k: tensors[k] for k in self.tensors}
        for k, d in _digests(ordered).items():
            self.check(k, ordered[k], d)


def recorded(path: str | os.PathLike, metadata: Mapping[str, str] | None) -> Record | None:
    """The :class:`Record` in ``metadata`` of the file at ``path``, or ``None`` if it has none.

    Raises ``LoadError`` if the entry is damaged (not the JSON object :func:`sign` writes), or if a
    record sits under another key (a damaged key name)."""
    metadata = metadata or {}
    text = metadata.get(KEY)
    if text is None:
        for k, v in metadata.items():
            if isinstance(v, str) and v.startswith(_SIGNATURE):
                raise LoadError(path, f"has a damaged checksum entry (metadata key {k!r})", DAMAGED_HINT)
        return None
    try:
        rec = json.loads(text)
        ok = (isinstance(rec, dict) and rec.get("algorithm") == ALGORITHM and isinstance(rec.get("tensors"), dict)
              and isinstance(rec.get("metadata"), str)
              and all(isinstance(v, str) for v in rec["tensors"].values()))
    except (json.JSONDecodeError, TypeError):
        ok = False
    if not ok:
        raise LoadError(path, f"has a damaged checksum entry (metadata {KEY!r})", DAMAGED_HINT)
    return Record(str(path), dict(rec["tensors"]), rec["metadata"])


def warn_unverified(path: str | os.PathLike) -> None:
    """Issue the :class:`UnverifiedFileWarning` of a file without a checksum."""
    warnings.warn(f"{path} carries no checksum (written before nmsparse recorded one): loaded unverified",
                  UnverifiedFileWarning, stacklevel=3)


def verify(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, *,
           note: bool = True) -> bool:
    """Check ``tensors`` and ``metadata`` read from ``path`` against its checksum entry.

    Returns ``True`` when verified, ``False`` when the file has no checksum (then, with ``note``, an
    :class:`UnverifiedFileWarning`). Raises :class:`~nmsparse.plumbing.errors.LoadError` naming the file and
    the first bad tensor (or the metadata) on any difference."""
    rec = recorded(path, metadata)
    if rec is None:
        if note:
            warn_unverified(path)
        return False
    rec.check_metadata(metadata or {})
    rec.check_all(tensors)
    return True


@contextlib.contextmanager
def cli_notes(prog: str) -> Iterator[None]:
    """Inside this block, an :class:`UnverifiedFileWarning` prints as one line ``PROG: note: ...`` on
    stderr (other warnings print as usual)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnverifiedFileWarning):
            print(f"{prog}: note: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UnverifiedFileWarning)
        warnings.showwarning = show
        yield


__all__ = ["ALGORITHM", "KEY", "Record", "UnverifiedFileWarning", "cli_notes", "metadata_digest", "recorded", "sign",
           "tensor_digest", "verify", "warn_unverified"]
