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

from nmsparse.reproduce.grid import Cell, Scale, transposable_missing
from nmsparse.training.checkpoint import atomic_write

TrainFn = Callable[..., list]
OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.pt", "final.safetensors", "error.txt")


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
    (a run killed mid-write) is ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
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
    path = Path(out) / "grid.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("scale", {})
    now = json.loads(json.dumps(scale.results_key()))
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}={a!r} there, {b!r} asked" for k, (a, b) in diff.items())
        raise ValueError(f"{out} holds a grid made with other settings ({what}): "
                         f"use another --out or the same settings")


def write_manifest(out: str | os.PathLike, scale: Scale, cells: list[Cell], experiments: list[str]) -> None:
    """Create or extend ``<out>/grid.json`` (settings, experiments and cells asked for so far)."""
    path = Path(out) / "grid.json"
    old = json.loads(path.read_text()) if path.exists() else {}
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


def run_cell(cell: Cell, scale: Scale, out: str | os.PathLike, *, train_fn: TrainFn,
             make_config: Callable[[dict], object], progress: bool = False) -> CellOutcome:
    """Run (or resume, or skip) one cell. Training errors are caught, kept in ``error.txt`` and
    reported as ``"failed"``; invalid settings raise ValueError before anything is written."""
    d = run_dir(out, cell)
    if cell.transposable and (why := transposable_missing()):
        return CellOutcome(cell, "not run", reason=why)
    fields = cell_config(cell, scale, out)
    config = make_config(fields)
    if hasattr(config, "validate"):
        config.validate()
    saved = d / "config.json"
    if saved.exists():
        old = _comparable(json.loads(saved.read_text()))
        new = _comparable(json.loads(json.dumps(fields)))
        diff = {k: (old.get(k), v) for k, v in new.items() if k in old and old[k] != v}
        if diff:
            raise ValueError(f"{d} was trained with other settings {diff}: use another --out")
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
    except Exception as e:  # keep going with the other cells; the report lists the failure
        (d / "error.txt").write_text(traceback.format_exc())
        return CellOutcome(cell, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    secs = time.perf_counter() - t0
    if cell_status(d, scale.epochs) != "done":
        msg = f"train() returned but {d} has no final epoch {scale.epochs} and final.safetensors"
        (d / "error.txt").write_text(msg + "\n")
        return CellOutcome(cell, "failed", secs, msg)
    return CellOutcome(cell, "resumed" if resume else "ran", secs)


def run_grid(cells: list[Cell], scale: Scale, out: str | os.PathLike, *, experiments: list[str],
             train_fn: TrainFn | None = None, make_config: Callable[[dict], object] | None = None,
             progress: bool = False, log: Callable[[str], None] | None = None,
             command: str | None = None, shard: tuple[int, int] | None = None) -> list[CellOutcome]:
    """Run every cell of ``cells`` that is not done yet, in order, and return one outcome per cell.

    ``shard=(i, k)`` runs only cells ``i-1, i-1+k, ...`` (K processes can share one grid folder; the
    manifest still lists every cell).

    ``train_fn(config, resume=..., progress=...)`` and ``make_config(dict)`` default to
    :func:`nmsparse.training.loop.train` and ``TrainConfig.from_dict`` (tests inject fakes).
    Raises ValueError (nothing written) if ``out`` holds a grid with other settings or a cell's
    settings are invalid.
    """
    if train_fn is None or make_config is None:
        t, mc = _default_train()
        train_fn, make_config = train_fn or t, make_config or mc
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_grid(out, scale)
    for c in cells:  # validate every config before writing anything
        if c.transposable and transposable_missing():
            continue
        cfg = make_config(cell_config(c, scale, out))
        if hasattr(cfg, "validate"):
            cfg.validate()
    write_manifest(out, scale, cells, experiments)
    if shard is not None:
        i, k = shard
        if not 1 <= i <= k:
            raise ValueError(f"shard must be (i, k) with 1 <= i <= k, got {shard}")
        cells = cells[i - 1::k]
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
