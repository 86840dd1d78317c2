"""Resuming a run: the checkpoint is read, its settings compared and its state checked against the
freshly built model before anything is restored, so a checkpoint that is damaged, made with other
settings (another N:M, method, layout, transposable setting, model...) or does not fit raises one
:class:`nmsparse.plumbing.errors.LoadError` naming the file, with nothing changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmsparse.masking.layout import layer_is_nm
from nmsparse.masking.transposable import layer_is_transposable_nm
from nmsparse.surgery.sad_tracker import SADTracker
from nmsparse.surgery.sparse_model import sparse_layers
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.io import state_dict_mismatch
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.config import TrainConfig

# Fields that may differ between a run and its resumption (they do not change the result on CPU).
RESUME_FREE_FIELDS = ("out", "data_dir", "threads", "device")
CHECKPOINT = "checkpoint.pt"
# What to do about a checkpoint that cannot be resumed (the CLI's flags; train(resume=False) in Python).
RESUME_HINT = "restore it, or start the run afresh with --overwrite instead of --resume"
SETTINGS_HINT = "resume with the checkpoint's settings, start afresh with --overwrite, or use another --out"


def read_resume_state(config: TrainConfig, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint that ``train(config, resume=True)`` would continue, or ``None`` if
    ``config.out`` holds none. Raises :class:`~nmsparse.plumbing.errors.LoadError` (nothing changed) when it is
    unreadable or damaged (see :func:`nmsparse.training.checkpoint.load`) or was made with other
    settings than ``config`` (fields outside ``RESUME_FREE_FIELDS``, e.g. another N:M, method,
    layout, transposable setting or model)."""
    path = Path(config.out) / CHECKPOINT
    if not path.exists() and not path.is_symlink():
        return None
    try:
        state = ckpt.load(path, map_location=map_location)
    except LoadError as e:
        raise e.with_hint(RESUME_HINT, action="cannot resume from") from e
    try:
        saved = TrainConfig.from_dict(state["config"]).to_dict()
    except (TypeError, ValueError) as e:
        raise LoadError(path, f"records a training config this version cannot read ({e})", RESUME_HINT,
                        action="cannot resume from") from e
    now = config.to_dict()
    diff = [k for k in now if k not in RESUME_FREE_FIELDS and now[k] != saved[k]]
    if diff:
        what = ", ".join(f"{k}={saved[k]!r}, now {now[k]!r}" for k in diff)
        raise LoadError(path, f"was made with other settings ({what})", SETTINGS_HINT,
                        action="cannot resume from")
    return state


def state_mismatch(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                   tracker: SADTracker, config: TrainConfig) -> str | None:
    """Why checkpoint ``state`` (from :func:`read_resume_state`) cannot be restored into a run of
    ``config`` with these freshly built ``model``, ``optimizer`` and SAD ``tracker``, or ``None``.

    Checks, without changing anything: the model's state-dict names and shapes, every mask a valid
    (transposable) N:M mask of its layer's N:M and layout, the optimizer's groups and buffer shapes,
    the SAD masks, the RNG states, and that epoch and records agree with ``config.epochs``.
    """
    cfg = config
    if cfg.fsdp:  # model and optimizer live in the DCP folder; loading it checks them
        return _rest_mismatch(state, tracker, cfg)
    why = state_dict_mismatch(model.state_dict(), state["model"])
    if why:
        return f"its model state does not fit model {cfg.model!r} with these settings: {why}"
    for name, _, p in sparse_layers(model):
        mask = state["model"][f"{name}.parametrizations.weight.0.mask" if name else "parametrizations.weight.0.mask"]
        ok = mask.dtype == torch.bool and (
            layer_is_transposable_nm(mask, p.n, p.m, p.layout) if p.transposable
            else layer_is_nm(mask, p.n, p.m, p.layout))
        if not ok:
            kind = "transposable " if p.transposable else ""
            return f"the mask of layer {name!r} is not a {kind}{p.n}:{p.m} mask in layout {p.layout!r}"
    why = optimizer_mismatch(optimizer, state["optimizer"])
    if why:
        return f"its optimizer state does not fit: {why}"
    return _rest_mismatch(state, tracker, cfg)


def _rest_mismatch(state: dict[str, Any], tracker: SADTracker, cfg: TrainConfig) -> str | None:
    """The checks of :func:`state_mismatch` beyond model and optimizer."""
    expected = tracker.initial
    for key in ("initial", "previous"):
        why = state_dict_mismatch(expected, state["sad"][key])
        if why:
            return f"its SAD {key} masks do not fit: {why}"
    rng = state["rng"]["torch"]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return "its torch RNG state is damaged"
    py = state["rng"].get("python")
    if py is not None and not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)
                               and len(py[1]) == 625):
        return "its Python RNG state is damaged"
    epoch, records = state["epoch"], state["records"]
    if not 0 <= epoch <= cfg.epochs or len(records) != epoch or not all(isinstance(r, dict) for r in records):
        return (f"it records epoch {epoch} of {cfg.epochs} with {len(records)} per-epoch record(s), "
                f"which do not fit")
    return None


def optimizer_mismatch(optimizer: torch.optim.Optimizer, saved: dict) -> str | None:
    """Why ``saved`` (an optimizer ``state_dict``) cannot be loaded into ``optimizer``, or ``None``."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        return "no param_groups / state"
    mine = optimizer.param_groups
    if len(groups) != len(mine) or any(not isinstance(g, dict) or len(g.get("params", ())) != len(h["params"])
                                       for g, h in zip(groups, mine)):
        return "other parameter groups"
    shapes = {i: p.shape for i, p in enumerate(p for g in mine for p in g["params"])}
    ids = [i for g in groups for i in g["params"]]
    for i, entry in state.items():
        if i not in ids or not isinstance(entry, dict):
            return f"state for an unknown parameter {i!r}"
        shape = shapes[ids.index(i)]
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != shape:
                return f"{k} of parameter {ids.index(i)} has shape {tuple(v.shape)}, the parameter {tuple(shape)}"
    return None
