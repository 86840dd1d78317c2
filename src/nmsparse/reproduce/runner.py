"""Run a grid of cells with :func:`nmsparse.training.loop.train`, continuing a partly done grid.

Each cell trains into ``<out>/runs/<run_id>/``. On every invocation a cell is

* skipped when it is done (``metrics.jsonl`` reaches the grid's last epoch and ``final.safetensors``
  exists),
* resumed from ``checkpoint.pt`` when a previous invocation was killed after an epoch,
* started afresh otherwise (also after a failure, whose message was kept in ``error.txt``).

``<out>/grid.json`` pins the settings that make results comparable (epochs, subsets, data, batch
size); a later invocation with different settings is refused rather than mixing two grids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.errors import WriteError
from nmsparse.plumbing.io import read_json
from nmsparse.reproduce.grid import Cell, Scale, transposable_missing
from nmsparse.training.checkpoint import atomic_write

TrainFn = Callable[..., list]
OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.pt", "final.safetensors", "error.txt")
GRID_HINT = "delete it (finished runs in OUT/runs are picked up again) or use another --out"
RUN_HINT = "delete the run's folder to train it again from the start"


def read_grid(out: str | os.PathLike, hint: str = GRID_HINT) -> dict | None:
    """The manifest ``<out>/grid.json`` as a dict, ``None`` if there is none; a damaged one raises
    :class:`~nmsparse.plumbing.errors.LoadError` (with ``hint``)."""
    path = Path(out) / "grid.json"
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = read_json(path)
    except LoadError as e:
        raise e.with_hint(hint) from e
    if not isinstance(data, dict):
        raise LoadError(path, f"holds a JSON {type(data).__name__}, not an nmsparse reproduce grid manifest", hint)
    bad = [k for k in ("cells", "seeds", "nms", "experiments") if not isinstance(data.get(k), list)]
    scale = data.get("scale")
    if not isinstance(scale, dict) or not isinstance(scale.get("epochs"), int):
        bad.insert(0, "scale")
    if bad:
        raise LoadError(path, f"is not a complete nmsparse reproduce grid manifest ({', '.join(bad)} missing "
                              f"or of the wrong type)", hint)
    return data


@dataclasses.dataclass
class CellOutcome:
    """What happened to one cell in one invocation: ``status`` is ``"done"`` (already finished,
    skipped), ``"ran"``, ``"resumed"``, ``"failed"`` or ``"not run"`` (``reason`` says why)."""

    cell: Cell
    status: str
    seconds: float = 0.0
    reason: str = ""


def run_dir(out: str | os.PathLike, cell: Cell) -> Path:
    return Path(out) / "runs" / cell.run_id


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The per-epoch records of a run's ``metrics.jsonl`` (empty if missing); a torn last line
    (a run killed mid-write) and anything after a damaged line are ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def cell_status(directory: str | os.PathLike, epochs: int) -> str:
    """``"done"``, ``"partial"`` (a checkpoint to resume from, also after a failure), ``"failed"``
    (no checkpoint; started afresh next time) or ``"todo"``."""
    d = Path(directory)
    rows = read_metrics(d)
    if rows and rows[-1].get("epoch") == epochs and (d / "final.safetensors").exists():
        return "done"
    if (d / "checkpoint.pt").exists():
        return "partial"
    if (d / "error.txt").exists():
        return "failed"
    return "todo"


def cell_config(cell: Cell, scale: Scale, out: str | os.PathLike) -> dict:
    """The TrainConfig fields of one cell, as a dict."""
    return {**scale.base(), **cell.settings, "seed": cell.seed, "out": str(run_dir(out, cell))}


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("out", "threads", "data_dir")}


def check_grid(out: str | os.PathLike, scale: Scale) -> None:
    """Refuse to continue a grid in ``out`` that was made with other settings (ValueError)."""
    grid = read_grid(out)
    if grid is None:
        return
    saved = grid.get("scale", {})
    now = json.loads(json.dumps(scale.results_key()))
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}={a!r} there, {b!r} asked" for k, (a, b) in diff.items())
        raise ValueError(f"{out} holds a grid made with other settings ({what}): "
                         f"use another --out or the same settings")


def write_manifest(out: str | os.PathLike, scale: Scale, cells: list[Cell], experiments: list[str]) -> None:
    """Create or extend ``<out>/grid.json`` (settings, experiments and cells asked for so far)."""
    path = Path(out) / "grid.json"
    old = read_grid(out) or {}
    ids = list(dict.fromkeys([*old.get("cells", []), *(c.run_id for c in cells)]))
    exps = [*dict.fromkeys([*old.get("experiments", []), *experiments])]
    seeds = sorted(set(old.get("seeds", [])) | set(scale.seeds))
    nms = list(dict.fromkeys([*old.get("nms", []), *scale.nms]))
    data = {"scale": scale.results_key(), "seeds": seeds, "nms": nms, "experiments": exps, "cells": ids}
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary file: shards started together write grid.json at the same moment
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def log_event(out: str | os.PathLike, **event) -> None:
    """Append one line to ``<out>/invocations.jsonl`` (command, start/end, wall time)."""
    path = Path(out) / "invocations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **event}) + "\n")


def _default_train() -> tuple[TrainFn, Callable[[dict], object]]:
    from nmsparse.training.config import TrainConfig
    from nmsparse.training.loop import train

    return train, TrainConfig.from_dict


def _check_saved_config(d: Path, fields: dict) -> None:
    """Refuse a run folder whose ``config.json`` is damaged or records other settings."""
    saved = d / "config.json"
    if not saved.exists() and not saved.is_symlink():
        return
    try:
        old = read_json(saved)
    except LoadError as e:
        raise e.with_hint(RUN_HINT) from e
    if not isinstance(old, dict):
        raise LoadError(saved, f"holds a {type(old).__name__}, not a training config", RUN_HINT)
    old = _comparable(old)
    new = _comparable(json.loads(json.dumps(fields)))
    diff = {k: (old.get(k), v) for k, v in new.items() if k in old and old[k] != v}
    if diff:
        raise ValueError(f"{d} was trained with other settings {diff}: use another --out")


def check_cell(cell: Cell, scale: Scale, out: str | os.PathLike, *, make_config: Callable[[dict], object],
               check_resume: Callable[[object], object] | None = None) -> None:
    """Everything :func:`run_cell` would refuse, checked without writing: invalid settings, a run
    folder with other settings, and (with ``check_resume``, e.g.
    :func:`nmsparse.training.resume.read_resume_state`) a checkpoint to resume that is damaged or does
    not fit. Raises ValueError (:class:`~nmsparse.plumbing.errors.LoadError` for a file)."""
    if cell.transposable and transposable_missing():
        return
    fields = cell_config(cell, scale, out)
    config = make_config(fields)
    if hasattr(config, "validate"):
        config.validate()
    d = run_dir(out, cell)
    _check_saved_config(d, fields)
    if check_resume is not None and cell_status(d, scale.epochs) == "partial":
        try:
            check_resume(config)
        except LoadError as e:
            raise e.with_hint(RUN_HINT) from e


def run_cell(cell: Cell, scale: Scale, out: str | os.PathLike, *, train_fn: TrainFn,
             make_config: Callable[[dict], object], progress: bool | str = False) -> CellOutcome:
    """Run (or resume, or skip) one cell. Training errors are caught, kept in ``error.txt`` and
    reported as ``"failed"``; invalid settings raise ValueError, and a file that cannot be loaded
    :class:`~nmsparse.plumbing.errors.LoadError`, before anything is written."""
    d = run_dir(out, cell)
    if cell.transposable and (why := transposable_missing()):
        return CellOutcome(cell, "not run", reason=why)
    fields = cell_config(cell, scale, out)
    config = make_config(fields)
    if hasattr(config, "validate"):
        config.validate()
    _check_saved_config(d, fields)
    status = cell_status(d, scale.epochs)
    if status == "done":
        return CellOutcome(cell, "done")
    resume = status == "partial"
    (d / "error.txt").unlink(missing_ok=True)
    if not resume:
        for name in OUTPUTS:
            (d / name).unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        train_fn(config, resume=resume, progress=progress)
    except KeyboardInterrupt:
        raise
    except LoadError as e:  # raised before the run changed anything: the user has to act
        raise e.with_hint(RUN_HINT) from e
    except WriteError:  # a full disk or a read-only folder stops every cell alike: one line, the grid stops
        raise
    except Exception as e:  # keep going with the other cells; the report lists the failure
        (d / "error.txt").write_text(traceback.format_exc())
        return CellOutcome(cell, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    secs = time.perf_counter() - t0
    if cell_status(d, scale.epochs) != "done":
        msg = f"train() returned but {d} has no final epoch {scale.epochs} and final.safetensors"
        (d / "error.txt").write_text(msg + "\n")
        return CellOutcome(cell, "failed", secs, msg)
    return CellOutcome(cell, "resumed" if resume else "ran", secs)


def _default_check(train_fn: TrainFn) -> Callable[[object], object] | None:
    from nmsparse.training import loop, resume

    return resume.read_resume_state if train_fn is loop.train else None


def run_grid(cells: list[Cell], scale: Scale, out: str | os.PathLike, *, experiments: list[str],
             train_fn: TrainFn | None = None, make_config: Callable[[dict], object] | None = None,
             progress: bool | str = False, log: Callable[[str], None] | None = None,
             command: str | None = None, shard: tuple[int, int] | None = None,
             check_resume: Callable[[object], object] | None = None) -> list[CellOutcome]:
    """Run every cell of ``cells`` that is not done yet, in order, and return one outcome per cell.

    ``shard=(i, k)`` runs only cells ``i-1, i-1+k, ...`` (K processes can share one grid folder; the
    manifest still lists every cell).

    ``train_fn(config, resume=..., progress=...)`` and ``make_config(dict)`` default to
    :func:`nmsparse.training.loop.train` and ``TrainConfig.from_dict`` (tests inject fakes).
    ``check_resume(config)`` (default: :func:`nmsparse.training.resume.read_resume_state` with the
    default trainer) vets each checkpoint this invocation would resume.
    Raises ValueError (nothing written) if ``out`` holds a grid with other settings or a cell's
    settings are invalid, and :class:`~nmsparse.plumbing.errors.LoadError` (nothing written) if ``grid.json``,
    a run's ``config.json`` or a checkpoint to resume is damaged or does not fit.
    """
    if train_fn is None or make_config is None:
        t, mc = _default_train()
        train_fn, make_config = train_fn or t, make_config or mc
    if check_resume is None:
        check_resume = _default_check(train_fn)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_grid(out, scale)
    mine = cells
    if shard is not None:
        i, k = shard
        if not 1 <= i <= k:
            raise ValueError(f"shard must be (i, k) with 1 <= i <= k, got {shard}")
        mine = cells[i - 1::k]
    for c in cells:  # validate every config, and the files this process will read, before writing anything
        check_cell(c, scale, out, make_config=make_config, check_resume=check_resume if c in mine else None)
    write_manifest(out, scale, cells, experiments)
    cells = mine
    cmd = command or " ".join(sys.argv)
    log_event(out, event="start", command=cmd, cells=len(cells))
    t0 = time.perf_counter()
    outcomes = []
    for i, cell in enumerate(cells, 1):
        before = cell_status(run_dir(out, cell), scale.epochs)
        verb = {"done": "done, skipped", "partial": "resuming", "failed": "retrying after failure"}.get(before, "running")
        if before != "done":
            log(f"[{i}/{len(cells)}] {cell.run_id}: {verb}")
        o = run_cell(cell, scale, out, train_fn=train_fn, make_config=make_config, progress=progress)
        if o.status in ("failed", "not run"):
            log(f"[{i}/{len(cells)}] {cell.run_id}: {o.status}: {o.reason}")
        elif o.status != "done":
            log(f"[{i}/{len(cells)}] {cell.run_id}: {o.status} in {o.seconds:.0f}s")
        outcomes.append(o)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "ran", "resumed", "failed", "not run")}
    log_event(out, event="end", command=cmd, wall_s=round(time.perf_counter() - t0, 1), **counts)
    return outcomes
