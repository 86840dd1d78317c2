"""Checksums of the folders nmsparse writes through another library (``torch.distributed.checkpoint``).

Such a folder holds files whose format we do not own, so their checksums go beside them: a manifest
``MANIFEST`` (``nmsparse.sha256.json``) lists the SHA-256 of every other file in the folder::

    {"algorithm": "sha256", "files": {name: hex, ...}}

:func:`sign_folder` writes it (atomically, after the files); :func:`verify_folder` checks, before anything
is read, that the folder holds exactly the listed files with exactly those bytes, and raises
:class:`~nmsparse.plumbing.errors.LoadError` naming the folder and the first bad file otherwise. A folder
without a manifest (written before nmsparse recorded one) is read unverified, with an
:class:`~nmsparse.plumbing.checksum.UnverifiedFileWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nmsparse.plumbing.checksum import ALGORITHM, DAMAGED_HINT, warn_unverified
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.writing import write_text

MANIFEST = "nmsparse.sha256.json"
_CHUNK = 4 << 20


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB chunks (hashing releases the GIL)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entries(folder: Path) -> list[str]:
    """Names of the folder's entries other than the manifest; a subfolder is refused (not ours)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    for name in names:
        if not (folder / name).is_file():
            raise LoadError(folder, f"holds {name!r}, which is not a file", DAMAGED_HINT)
    return names


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(folder / n), names)))


def sign_folder(folder: str | os.PathLike) -> None:
    """Write the manifest of every file now in ``folder`` (call once the folder is complete)."""
    folder = Path(folder)
    files = _digests(folder, _entries(folder))
    write_text(folder / MANIFEST, json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True) + "\n")


def verify_folder(folder: str | os.PathLike, *, note: bool = True) -> bool:
    """Check ``folder`` against its manifest. ``True`` when verified; ``False`` when it has none (then,
    with ``note``, an ``UnverifiedFileWarning``). ``LoadError`` naming the folder and the first bad file
    (changed, missing, added) or a damaged manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if note:
            warn_unverified(folder)
        return False
    try:
        rec = json.loads(path.read_text())
        ok = (isinstance(rec, dict) and rec.get("algorithm") == ALGORITHM and isinstance(rec.get("files"), dict)
              and all(isinstance(k, str) and isinstance(v, str) for k, v in rec["files"].items()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise LoadError(folder, f"has a damaged checksum manifest ({MANIFEST})", DAMAGED_HINT)
    listed: dict[str, str] = rec["files"]
    present = _entries(folder)
    for name in sorted(listed):
        if name not in present:
            raise LoadError(folder, f"lacks {name!r}, which its checksum manifest lists", DAMAGED_HINT)
    for name in present:
        if name not in listed:
            raise LoadError(folder, f"holds {name!r}, which its checksum manifest does not list", DAMAGED_HINT)
    digests = _digests(folder, present)
    for name in present:
        if digests[name] != listed[name]:
            raise LoadError(folder, f"checksum mismatch in {name!r}", DAMAGED_HINT)
    return True


__all__ = ["MANIFEST", "file_digest", "sign_folder", "verify_folder"]
