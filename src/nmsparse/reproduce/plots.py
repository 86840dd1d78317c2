"""The report's PNG figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nmsparse.reproduce.results import as_percent, curve, layer_sad, mean_std, final_values, sad_total  # noqa: E402


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _band(ax, epochs, mu, sd, label):
    if not epochs:
        return
    line, = ax.plot(epochs, mu, marker="o", ms=3, label=label)
    lo = [a - b for a, b in zip(mu, sd)]
    hi = [a + b for a, b in zip(mu, sd)]
    ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)


def accuracy_bars(runs: dict, rows: list[tuple[str, dict[str, str]]], path: Path, title: str) -> str | None:
    """Grouped bars: one group per row label, one bar per series (``{series: key}``), mean ± std."""
    series = list(dict.fromkeys(s for _, d in rows for s in d))
    if not any(final_values(runs, k) for _, d in rows for k in d.values()):
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    width = 0.8 / max(1, len(series))
    lows = []
    for j, s in enumerate(series):
        xs, mus, sds = [], [], []
        for i, (_, d) in enumerate(rows):
            mu, sd, n = mean_std([as_percent(v) for v in final_values(runs, d[s])]) if s in d else (math.nan, 0, 0)
            if n:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                mus.append(mu)
                sds.append(sd)
                lows.append(mu - sd)
        ax.bar(xs, mus, width, yerr=sds, capsize=3, label=s)
    ax.set_xticks(range(len(rows)), [r for r, _ in rows])
    ax.set_ylabel("test top-1 (%)")
    if lows:
        ax.set_ylim(max(0, min(lows) - 5), 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def curves(runs: dict, series: dict[str, str], panels: list[tuple[str, object]], path: Path, title: str) -> str | None:
    """One panel per ``(ylabel, getter)``; one line per series (``{label: key}``) with a ±std band."""
    if not any(curve(runs, k, panels[0][1])[0] for k in series.values()):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, get) in zip(axes[0], panels):
        for label, key in series.items():
            _band(ax, *curve(runs, key, get), label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def layer_sad_bars(runs: dict, series: dict[str, str], path: Path, title: str) -> str | None:
    """Per-layer SAD vs the initial mask (fraction of the layer's weights), one bar per series."""
    data = {label: layer_sad(runs, key) for label, key in series.items()}
    layers = list(dict.fromkeys(name for d in data.values() for name in d))
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) * len(series)), 4))
    width = 0.8 / len(series)
    for j, (label, d) in enumerate(data.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, name in enumerate(layers) if name in d]
        mus = [100 * d[name][0] for name in layers if name in d]
        sds = [100 * d[name][1] for name in layers if name in d]
        ax.bar(xs, mus, width, yerr=sds, capsize=2, label=label)
    ax.set_xticks(range(len(layers)), [n.removesuffix(".weight") for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SAD vs initial mask (% of weights)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def acc_getter(r: dict) -> float:
    return as_percent(r["test_acc"])


def sad_initial_getter(r: dict) -> float:
    return 100 * sad_total(r, "vs_initial_frac")


def sad_previous_getter(r: dict) -> float:
    return 100 * sad_total(r, "vs_previous_frac")


def figure_dir(report_path: str | os.PathLike) -> Path:
    return Path(report_path).parent
