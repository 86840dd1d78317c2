"""What :func:`nmsparse.prune` returns: one :class:`LayerResult` per pruned layer inside a :class:`PruneReport`."""

from __future__ import annotations

import dataclasses

from nmsparse.surgery.selection import SparsityReport


@dataclasses.dataclass
class LayerResult:
    """What pruning did to one layer.

    ``kept_abs``: fraction of the layer's original ``sum |w|`` at kept positions. ``error_before`` /
    ``error_after``: relative reconstruction error on the calibration inputs,
    ``||(W - W') X + (b - b')||^2 / ||W X + b||^2``, with ``W'`` the mask applied to the original
    weights (before any update) and the final weights (after); None without calibration data.
    ``rows``: calibration rows (tokens, positions) seen. ``time_s``: seconds for this layer, the
    calibration pass included. ``note``: anything unusual.
    """

    param: str
    kept_abs: float
    error_before: float | None
    error_after: float | None
    time_s: float
    rows: int = 0
    note: str = ""


class PruneReport(SparsityReport):
    """A :class:`~nmsparse.SparsityReport` with one :class:`LayerResult` per pruned layer."""

    def __init__(self, n: int, m: int, layers, settings: dict, results: dict[str, LayerResult], time_s: float):
        super().__init__(n, m, layers, settings)
        self.results = results
        self.time_s = time_s

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["results"] = {k: dataclasses.asdict(v) for k, v in self.results.items()}
        d["time_s"] = self.time_s
        if getattr(self, "permutation", None) is not None:
            d["permutation"] = self.permutation.to_dict()
        return d

    def mean(self, field: str) -> float | None:
        vals = [getattr(r, field) for r in self.results.values() if getattr(r, field) is not None]
        return sum(vals) / len(vals) if vals else None

    def table(self) -> str:
        def f(v):
            return "-" if v is None else f"{v:.4f}"

        rows = [("layer", "shape", "kept |w|", "err before", "err after", "time")]
        for e in self.layers:
            r = self.results.get(e.param)
            if r is None:
                rows.append((e.param, "x".join(map(str, e.shape)), f"dense: {e.reason}", "", "", ""))
            else:
                rows.append((e.param, "x".join(map(str, e.shape)), f"{r.kept_abs:.4f}", f(r.error_before),
                             f(r.error_after), f"{r.time_s:.2f}s"))
        widths = [max(len(r[i]) for r in rows if not (r[2].startswith("dense") and i == 2)) for i in range(6)]
        lines = []
        for r in rows:
            if r[2].startswith("dense"):
                lines.append(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}")
            else:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        s = self.settings
        extra = f", solver={s['solver']}" if s.get("method") == "adaprune" else ""
        t = ", transposable" if s.get("transposable") else ""
        lines.append(
            f"{self.n}:{self.m} {s.get('method')}{extra}{t}: {len(self.sparse)} layers pruned, "
            f"{len(self.dense)} dense; mean error before {f(self.mean('error_before'))}, "
            f"after {f(self.mean('error_after'))}; {self.time_s:.1f}s"
        )
        return "\n".join(lines)
