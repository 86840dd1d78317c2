"""Read finished grid runs and aggregate them over seeds (pure: no plotting, no training)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from nmsparse.reproduce.runner import cell_status, read_metrics


def load_runs(out: str | os.PathLike, run_ids: list[str], epochs: int) -> dict[str, dict]:
    """``{run_id: {"status": ..., "metrics": [...]}}`` for the given run ids; ``metrics`` is only
    filled for finished runs (a partly trained run does not enter the tables)."""
    res = {}
    for rid in run_ids:
        d = Path(out) / "runs" / rid
        status = cell_status(d, epochs) if d.exists() else "todo"
        res[rid] = {"status": status, "metrics": read_metrics(d) if status == "done" else []}
    return res


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; ``(nan, nan, 0)`` if empty."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return math.nan, math.nan, 0
    mu = sum(v) / len(v)
    sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mu, sd, len(v)


def seed_runs(runs: dict[str, dict], key: str) -> list[list[dict]]:
    """The metrics lists of every finished seed of setting ``key``."""
    return [r["metrics"] for rid, r in sorted(runs.items())
            if rid.rsplit("_seed", 1)[0] == key and r["metrics"]]


def final_values(runs: dict[str, dict], key: str, field: str = "test_acc") -> list[float]:
    """The last epoch's ``field`` of each finished seed of ``key``."""
    return [m[-1][field] for m in seed_runs(runs, key)]


def sad_total(row: dict, which: str = "vs_initial_frac") -> float:
    """A record's total SAD fraction (nan when the epoch has no SAD)."""
    sad = row.get("sad")
    return math.nan if not sad else float(sad["total"][which])


def final_sad(runs: dict[str, dict], key: str, which: str = "vs_initial_frac") -> list[float]:
    return [sad_total(m[-1], which) for m in seed_runs(runs, key)]


def layer_sad(runs: dict[str, dict], key: str, which: str = "vs_initial_frac") -> dict[str, tuple[float, float, int]]:
    """Per layer: mean, std and count over seeds of the last epoch's SAD ``which``."""
    per: dict[str, list[float]] = {}
    for m in seed_runs(runs, key):
        sad = m[-1].get("sad") or {}
        for name, rec in (sad.get("layers") or {}).items():
            per.setdefault(name, []).append(float(rec[which]))
    return {name: mean_std(v) for name, v in per.items()}


def curve(runs: dict[str, dict], key: str, get) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std over seeds of ``get(record)`` per epoch (epochs all seeds reached)."""
    ms = seed_runs(runs, key)
    if not ms:
        return [], [], []
    n = min(len(m) for m in ms)
    epochs, mu, sd = [], [], []
    for i in range(n):
        a, s, _ = mean_std([get(m[i]) for m in ms])
        epochs.append(ms[0][i]["epoch"])
        mu.append(a)
        sd.append(s)
    return epochs, mu, sd


def as_percent(x: float) -> float:
    """Accuracies are fractions in [0, 1] in metrics.jsonl; the report shows percent."""
    return x * 100.0
