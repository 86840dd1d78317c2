"""Checkpoints that resume bit for bit and load without running pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, written with
``torch.save`` to a temporary file in the same folder, flushed to disk, then moved over the old one
with ``os.replace`` (atomic on POSIX; :func:`nmsparse.plumbing.writing.atomic_write`), so a run killed
mid-write leaves the previous checkpoint intact, and a full disk or a read-only folder raises one
:class:`nmsparse.plumbing.errors.WriteError` naming ``checkpoint.pt``. :func:`load` uses ``torch.load(weights_only=True)`` and raises
:class:`nmsparse.plumbing.errors.LoadError` (one line naming the file and the problem) for a file it cannot use.

Contents (``FORMAT = 1``): ``format``, ``epoch`` (epochs completed), ``config`` (dict), ``model``
(state dict, masks and mask-step counters included), ``optimizer``, ``scheduler``, ``rng``
(torch CPU and CUDA generator states, Python's ``random`` state), ``sad`` (the tracker's initial
and previous masks) and ``records`` (the per-epoch metrics so far), and ``checksum``: a SHA-256 of all of the above (every
tensor's dtype, shape and bytes, every other value's ``repr``), which :func:`load` verifies, so bytes
damaged inside a tensor (which ``torch.load`` reads without complaint) are found. A checkpoint without
``checksum`` (written before it existed) still loads, with an
:class:`nmsparse.plumbing.checksum.UnverifiedFileWarning`.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from nmsparse.plumbing.checksum import warn_unverified
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.io import read_torch
from nmsparse.plumbing.writing import atomic_write  # noqa: F401 - here for the writers that import it from this module

FORMAT = 1


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_py_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_state_from_list(st: list) -> tuple:
    version, internal, gauss = st
    return (version, tuple(internal), gauss)


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``state`` without its ``checksum`` entry: tensors by dtype, shape and bytes,
    containers in order, other values by ``repr``. The same after a ``torch.save`` / ``torch.load``
    round trip, on any device."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # a buffer: no copy, GIL released
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
            for v in x:
                walk(v)
        else:
            r = repr(x)
            h.update(f"V{len(r)}:{r}".encode())

    walk({k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (plain data and tensors only) atomically, with its :func:`checksum`."""
    state = dict(state, format=FORMAT)
    state["checksum"] = checksum(state)
    atomic_write(path, lambda f: torch.save(state, f))


# Names of the entries a checkpoint may hold; a SHA-256 hex digest under another name is a damaged "checksum".
_KNOWN = ("format", "checksum", "dcp", "epoch", "config", "model", "optimizer", "scheduler", "rng", "sad", "records")
_DIGEST = re.compile("[0-9a-f]{64}")

# The entries of a checkpoint and the type each must have.
_ENTRIES = {"epoch": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict,
            "sad": dict, "records": list}


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs) and check its structure.

    Raises :class:`nmsparse.plumbing.errors.LoadError` (a ``ValueError``) naming ``path`` when the file is
    missing, a directory, empty, truncated, corrupted (also: contents that do not match the recorded
    :func:`checksum`), not a ``torch.save`` file, or not an nmsparse training checkpoint of this
    format (an entry missing or of the wrong type). Whether it fits a
    model and settings is checked by the training loop before anything is restored.
    """
    state = read_torch(path, map_location=map_location)
    if not isinstance(state, dict) or "format" not in state:
        raise LoadError(path, f"is not an nmsparse training checkpoint (a torch.save file, but of a "
                              f"{type(state).__name__} without the 'format' entry)")
    if state["format"] != FORMAT:
        raise LoadError(path, f"is an nmsparse checkpoint of format {state['format']!r}; this version reads "
                              f"format {FORMAT}")
    for key, kind in _ENTRIES.items():
        if key in ("model", "optimizer") and key not in state and isinstance(state.get("dcp"), str):
            continue  # an FSDP2 run: model and optimizer are in the DCP folder "dcp" names
        if key not in state:
            raise LoadError(path, f"is an incomplete nmsparse training checkpoint (no {key!r} entry)")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise LoadError(path, f"is a damaged nmsparse training checkpoint (its {key!r} entry is a "
                                  f"{type(state[key]).__name__}, not a {kind.__name__})")
    for key in ("initial", "previous"):
        if not isinstance(state["sad"].get(key), dict):
            raise LoadError(path, f"is a damaged nmsparse training checkpoint (no sad.{key} masks)")
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        raise LoadError(path, "is a damaged nmsparse training checkpoint (no torch RNG state)")
    if "checksum" in state:
        if state["checksum"] != checksum(state):
            raise LoadError(path, "is corrupted (its contents do not match the checksum recorded when it was written)")
    else:
        renamed = [k for k, v in state.items() if k not in _KNOWN and isinstance(v, str) and _DIGEST.fullmatch(v)]
        if renamed:  # a damaged entry name: the checksum is there, under another key
            raise LoadError(path, f"is corrupted (its checksum entry is stored under a damaged name {renamed[0]!r})")
        warn_unverified(path)
    return state
