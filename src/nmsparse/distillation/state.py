"""Distillation checkpoints: written and verified with :mod:`nmsparse.training.checkpoint` (atomic
write, SHA-256 checksum, ``weights_only`` load, RNG states), checked before anything is restored.

Contents: ``format``, ``kind`` (``"distill"``), ``step`` (optimizer steps done), ``config`` (the
settings of the run, :data:`RESUME_FREE` excepted, which must match to resume), ``model`` (the
student's state dict, masks and mask counters included), ``optimizer``, ``scheduler``, ``rng``,
``records`` (the logged losses so far) and ``checksum``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.io import read_torch, state_dict_mismatch
from nmsparse.masking.layout import layer_is_nm
from nmsparse.surgery.sparse_model import sparse_tensors
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.resume import optimizer_mismatch

KIND = "distill"
CHECKPOINT = "checkpoint.pt"
HINT = "restore it, or start afresh with resume=False (--overwrite on the command line)"
SETTINGS_HINT = "resume with the checkpoint's settings, start afresh (resume=False / --overwrite), or use another out"
_ENTRIES = {"step": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict,
            "records": list}


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a distillation checkpoint atomically, with its checksum."""
    ckpt.save(path, dict(state, kind=KIND))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a distillation checkpoint (no pickled code runs). Raises
    :class:`~nmsparse.plumbing.errors.LoadError` naming ``path`` for a file that is unreadable, damaged
    (checksum), of another format or kind, or missing an entry."""
    try:
        state = read_torch(path)
    except LoadError as e:
        raise e.with_hint(HINT, action="cannot resume from") from e
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise LoadError(path, "is not an nmsparse distillation checkpoint (no kind='distill' entry)", HINT,
                        action="cannot resume from")
    if state.get("format") != ckpt.FORMAT:
        raise LoadError(path, f"is of format {state.get('format')!r}; this version reads {ckpt.FORMAT}", HINT,
                        action="cannot resume from")
    for key, kind in _ENTRIES.items():
        v = state.get(key)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise LoadError(path, f"is a damaged distillation checkpoint (entry {key!r} missing or not a "
                                  f"{kind.__name__})", HINT, action="cannot resume from")
    if state.get("checksum") != ckpt.checksum(state):
        raise LoadError(path, "is corrupted (its contents do not match the checksum recorded when it was written)",
                        HINT, action="cannot resume from")
    return state


def mismatch(state: dict[str, Any], config: dict[str, Any], model: nn.Module,
             optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``state`` cannot be restored into this run (settings ``config``, freshly prepared
    ``model`` and ``optimizer``), or ``None``. Changes nothing."""
    saved = state["config"]
    diff = [k for k in config if saved.get(k, object()) != config[k]]
    if diff or set(saved) != set(config):
        what = ", ".join(f"{k}={saved.get(k)!r}, now {config.get(k)!r}" for k in diff) or "other settings"
        return f"was made with other settings ({what})"
    why = state_dict_mismatch(model.state_dict(), state["model"])
    if why:
        return f"its student state does not fit this student: {why}"
    for full, _, _, p in sparse_tensors(model):
        key = full.rsplit(".", 1)
        mask = state["model"].get(f"{key[0]}.parametrizations.{key[1]}.0.mask" if len(key) == 2
                                  else f"parametrizations.{full}.0.mask")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not layer_is_nm(mask, p.n, p.m, p.layout):
            return f"the mask of {full!r} is not a {p.n}:{p.m} mask"
    why = optimizer_mismatch(optimizer, state["optimizer"])
    if why:
        return f"its optimizer state does not fit: {why}"
    if not 0 <= state["step"] <= config["steps"]:
        return f"it records step {state['step']} of {config['steps']}"
    rng = state["rng"].get("torch")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return "its torch RNG state is damaged"
    return None
