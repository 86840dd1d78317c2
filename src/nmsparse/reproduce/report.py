"""Write ``report.md`` (tables of mean ± std over seeds, the claims checked, PNG plots) for a grid.

Reads ``<out>/grid.json``, ``<out>/invocations.jsonl`` and each ``<out>/runs/<run_id>/metrics.jsonl``.
Only finished runs enter the numbers; every cell that is missing, partial, failed or not run is
listed as such, so a report of a partly done grid says exactly what ran.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nmsparse.reproduce import plots
from nmsparse.reproduce.grid import (
    DECAYS, EXPERIMENTS, MASK_METHODS, TRANSPOSABLE_NMS, TRANSPOSABLE_UPDATE_EVERY, cell_key, transposable_missing,
)
from nmsparse.reproduce.runner import read_grid
from nmsparse.reproduce.results import as_percent, final_sad, final_values, layer_sad, load_runs, mean_std

# Published ImageNet ResNet-50 top-1 (SR-STE paper / its model zoo; see docs/reproduce.md).
PAPER_R50 = {"dense": "77.3", "2:4": "77.0", "4:8": "77.4", "1:4": "75.3", "2:8": "76.2", "1:8": "-", "1:16": "71.5"}


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mu, sd, n = mean_std([v * scale for v in values])
    if not n:
        return ""
    if n == 1:
        return f"{mu:.{digits}f} (n=1)"
    return f"{mu:.{digits}f} ± {sd:.{digits}f}" + ("" if n == 3 else f" (n={n})")


def _json_line(line: str) -> object:
    """One line of a JSON-lines log, ``None`` if torn or damaged (a run killed mid-write)."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


class _Report:
    def __init__(self, out: Path, figdir: Path, grid: dict) -> None:
        self.out, self.figdir = out, figdir
        self.grid = grid
        self.scale = grid["scale"]
        self.epochs = self.scale["epochs"]
        self.seeds = grid["seeds"]
        self.nms = grid["nms"]
        self.experiments = [e for e in (*EXPERIMENTS, "demo") if e in grid["experiments"]]
        self.runs = load_runs(out, grid["cells"], self.epochs)
        self.missing_transposable = transposable_missing()
        self.lines: list[str] = []
        self.figures: list[str] = []

    # -- helpers -------------------------------------------------------------------------------
    def status(self, key: str) -> str:
        ids = [r for r in self.runs if r.rsplit("_seed", 1)[0] == key]
        if not ids:
            return "not in grid"
        sts = [self.runs[r]["status"] for r in ids]
        if "transposable" in key and self.missing_transposable and "done" not in sts:
            return "not run (feature missing)"
        parts = [f"{sts.count(s)} {s}" for s in ("failed", "partial", "todo") if sts.count(s)]
        return "not run: " + ", ".join(parts) if parts else ""

    def acc(self, key: str) -> str:
        vals = final_values(self.runs, key)
        return _fmt(vals, 100) or f"*{self.status(key)}*"

    def sadcell(self, key: str, which: str = "vs_initial_frac") -> str:
        vals = [v for v in final_sad(self.runs, key, which) if not math.isnan(v)]
        return _fmt(vals, 100) or f"*{self.status(key) or 'no SAD'}*"

    def figure(self, name: str | None, caption: str) -> None:
        if name:
            self.figures.append(name)
            self.lines += [f"![{caption}]({name})", ""]
        else:
            self.lines += [f"*({caption}: no finished run to plot yet)*", ""]

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    # -- sections ------------------------------------------------------------------------------
    def header(self) -> None:
        s = self.scale
        events = []
        p = self.out / "invocations.jsonl"
        if p.exists():
            events = [e for e in map(_json_line, p.read_text(errors="replace").splitlines()) if isinstance(e, dict)]
        ends = [e for e in events if e.get("event") == "end"]
        total = sum(e.get("wall_s", 0) for e in ends)
        done = sum(r["status"] == "done" for r in self.runs.values())
        train_s = sum(sum(row.get("time", 0) for row in r["metrics"]) for r in self.runs.values())
        subset = f"first {s['train_subset']} training images" if s.get("train_subset") else "all 60,000 training images"
        test = f"first {s['test_subset']} test images" if s.get("test_subset") else "all 10,000 test images"
        self.add(
            "# nmsparse reproduce: the SR-STE and transposable-mask claims at small scale", "",
            f"Data: {s['data']}, {subset}, {test}. {self.epochs} epochs per run, batch {s['batch_size']}, "
            f"seeds {', '.join(map(str, self.seeds))}. Accuracies are test top-1 (%) after the last epoch, "
            "mean ± sample std over seeds (n is shown when fewer than 3 seeds finished). SAD is the share (%) of "
            "mask positions that differ from the initial mask (the paper's SAD divided by the mask size).", "",
            f"Runs finished: **{done} of {len(self.runs)}**; summed training time of finished runs "
            f"{train_s / 60:.1f} min; wall time of the invocations that ended: {total / 60:.1f} min "
            f"(summed; processes run side by side with `--shard` overlap){self._span(events)}.", "",
            "Commands (each invocation continues the grid where the previous one stopped):", "",
        )
        for e in events:
            if e.get("event") == "end":
                self.add(f"- `{e['command']}` (ended {e['time']}, {e['wall_s'] / 60:.1f} min wall; "
                         f"ran {e.get('ran', 0)}, resumed {e.get('resumed', 0)}, skipped {e.get('done', 0)}, "
                         f"failed {e.get('failed', 0)}, not run {e.get('not run', 0)})")
        starts, nend = [e for e in events if e.get("event") == "start"], len(ends)
        if len(starts) > nend:
            self.add(f"- `{starts[-1]['command']}` (started {starts[-1]['time']}, had not ended when this report was written)")
        self.add("")

    @staticmethod
    def _span(events: list[dict]) -> str:
        import datetime as dt

        stamps = [dt.datetime.strptime(e["time"], "%Y-%m-%d %H:%M:%S") for e in events if "time" in e]
        if len(stamps) < 2:
            return ""
        return f"; first start to last event: {(max(stamps) - min(stamps)).total_seconds() / 60:.1f} min"

    def claims(self) -> None:
        self.add("## The claims at this scale", "",
                 "Verdict rule: *reproduced* when the difference has the paper's sign and exceeds the combined "
                 "seed std (sqrt(sd_a² + sd_b²)); *opposite* when it has the other sign beyond that; "
                 "*within noise* otherwise; *one seed* when a side has a single run (sign only).", "",
                 "| claim (paper) | measured here | verdict |", "|---|---|---|")
        r = self.runs
        rows = []
        exps = set(self.experiments)
        if {"table", "sad"} & exps:
            for nm in (self.nms if "table" in exps else ["2:4"]):
                rows.append((f"SR-STE beats STE at {nm} (Table)", final_values(r, cell_key("resnet", nm, "srste")),
                             final_values(r, cell_key("resnet", nm, "ste")), 100, "top-1"))
        if {"table", "sad", "demo"} & exps:
            rows.append(("SR-STE 2:4 matches dense (no loss)", final_values(r, cell_key("resnet", "2:4", "srste")),
                         final_values(r, cell_key("resnet", "dense")), 100, "top-1 (gap)"))
        if "table" in self.experiments:
            rows.append(("ViT: SR-STE beats STE at 2:4", final_values(r, cell_key("vit", "2:4", "srste")),
                         final_values(r, cell_key("vit", "2:4", "ste")), 100, "top-1"))
        if "sad" in self.experiments:
            rows.append(("STE flips more mask bits than dense training (Fig. 3b)",
                         final_sad(r, cell_key("resnet", "2:4", "ste")), final_sad(r, cell_key("resnet", "dense")), 100, "SAD %"))
            rows.append(("SR-STE flips fewer mask bits than STE (Fig. 4)",
                         final_sad(r, cell_key("resnet", "2:4", "ste")),
                         final_sad(r, cell_key("resnet", "2:4", "srste")), 100, "SAD % (STE vs SR-STE)"))
        if "decay" in self.experiments:
            best, neg = cell_key("resnet", "2:4", "srste"), cell_key("resnet", "2:4", "srste", decay=-2e-4)
            rows.append(("lambda_w < 0 lowers accuracy (Fig. 4a)", final_values(r, best), final_values(r, neg), 100, "top-1 (2e-4 − (−2e-4))"))
            rows.append(("lambda_w < 0 raises SAD (Fig. 4a)", final_sad(r, neg), final_sad(r, best), 100, "SAD % ((−2e-4) − 2e-4)"))
        if "transposable" in self.experiments:
            t = cell_key("resnet", "4:8", "srste", transposable=True, mask_method="approx", update_every=TRANSPOSABLE_UPDATE_EVERY)
            rows.append(("transposable 4:8 close to plain 2:4 (Hubara)", final_values(r, t),
                         final_values(r, cell_key("resnet", "2:4", "srste")), 100, "top-1 (T4:8 − 2:4)"))
        for claim, a, b, scale, what in rows:
            a = [v for v in a if not math.isnan(v)]
            b = [v for v in b if not math.isnan(v)]
            if not a or not b:
                self.add(f"| {claim} | not measured (runs missing) | - |")
                continue
            ma, sa, na = mean_std([v * scale for v in a])
            mb, sb, nb = mean_std([v * scale for v in b])
            diff, noise = ma - mb, math.hypot(sa, sb)
            if "no loss" in claim or "close to" in claim:
                verdict = ("reproduced (gap within seed noise)" if abs(diff) <= max(noise, 0.0) or diff >= 0
                           else f"not reproduced: {abs(diff):.2f} points lower")
                if min(na, nb) < 2:
                    verdict = "one seed: " + ("no loss" if diff >= 0 else f"{abs(diff):.2f} points lower")
            elif min(na, nb) < 2:
                verdict = "one seed: " + ("paper's sign" if diff > 0 else "opposite sign")
            elif diff > noise:
                verdict = "reproduced"
            elif diff < -noise:
                verdict = "**opposite**, beyond seed noise"
            else:
                verdict = "within noise"
            self.add(f"| {claim} | {what}: {ma:.2f} vs {mb:.2f} (diff {diff:+.2f}, noise {noise:.2f}) | {verdict} |")
        self.add("")

    def table(self) -> None:
        self.add("## 1. Top-1 of dense, STE and SR-STE (SR-STE paper's table)", "",
                 "| model | N:M | dense | STE | SR-STE | SR-STE − STE | paper R50 ImageNet SR-STE |",
                 "|---|---|---|---|---|---|---|")
        dense = cell_key("resnet", "dense")
        bar_rows = []
        for nm in self.nms:
            ste, sr = cell_key("resnet", nm, "ste"), cell_key("resnet", nm, "srste")
            d = mean_std(final_values(self.runs, sr))[0] - mean_std(final_values(self.runs, ste))[0]
            self.add(f"| ResNet | {nm} | {self.acc(dense)} | {self.acc(ste)} | {self.acc(sr)} | "
                     f"{'' if math.isnan(d) else f'{100 * d:+.2f}'} | {PAPER_R50.get(nm, '-')} |")
            bar_rows.append((nm, {"dense": dense, "STE": ste, "SR-STE": sr}))
        vd, vs, vr = cell_key("vit", "dense"), cell_key("vit", "2:4", "ste"), cell_key("vit", "2:4", "srste")
        self.add(f"| ViT | 2:4 | {self.acc(vd)} | {self.acc(vs)} | {self.acc(vr)} | | |", "")
        bar_rows.append(("ViT 2:4", {"dense": vd, "STE": vs, "SR-STE": vr}))
        self.add("The paper's column is ImageNet ResNet-50 after 120 epochs (dense about 77.3; 2:4 and 4:8 from the "
                 "authors' model zoo, 1:4, 2:8 and 1:16 from the paper's table as quoted by secondary sources, "
                 "unverified): it shows the trend the paper reports (no loss at 2:4 and 4:8, a loss growing "
                 "with sparsity), not numbers comparable to these.", "")
        self.figure(plots.accuracy_bars(self.runs, bar_rows, self.figdir / "table_accuracy.png",
                                        "Fashion-MNIST top-1, mean ± std over seeds"), "Top-1 by N:M and method")

    def decay(self) -> None:
        self.add("## 2. SR-STE lambda_w: accuracy and SAD over epochs (Figure 4a)", "",
                 "| lambda_w | top-1 | SAD vs initial (%) | SAD vs previous epoch, last epoch (%) |", "|---|---|---|---|")
        series = {}
        for d in DECAYS:
            k = cell_key("resnet", "2:4", "srste", decay=d)
            series[f"λ={d:g}"] = k
            self.add(f"| {d:g} | {self.acc(k)} | {self.sadcell(k)} | {self.sadcell(k, 'vs_previous_frac')} |")
        self.add("", "lambda_w = 0 is SR-STE without the refining term, i.e. STE." + self._zero_decay_check(), "")
        self.figure(plots.curves(self.runs, series, [("test top-1 (%)", plots.acc_getter),
                                                     ("SAD vs initial mask (%)", plots.sad_initial_getter),
                                                     ("SAD vs previous epoch (%)", plots.sad_previous_getter)],
                                 self.figdir / "decay_curves.png", "ResNet SR-STE 2:4, by lambda_w"),
                    "Accuracy and SAD over epochs by lambda_w")

    def _zero_decay_check(self) -> str:
        """Consistency check: SR-STE at lambda_w = 0 and STE, same seed, should train identically."""
        zero, ste = cell_key("resnet", "2:4", "srste", decay=0.0), cell_key("resnet", "2:4", "ste")
        pairs = [(self.runs.get(f"{zero}_seed{s}", {}).get("metrics"), self.runs.get(f"{ste}_seed{s}", {}).get("metrics"))
                 for s in self.seeds]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            return ""
        same = sum([r["test_acc"] for r in a] == [r["test_acc"] for r in b] for a, b in pairs)
        return (f" Check: with the same seed, SR-STE at lambda_w = 0 and STE reach identical test accuracy at every "
                f"epoch in {same} of {len(pairs)} seeds.")

    def sad(self) -> None:
        dense, ste, sr = cell_key("resnet", "dense"), cell_key("resnet", "2:4", "ste"), cell_key("resnet", "2:4", "srste")
        series = {"dense (magnitude 2:4 masks)": dense, "STE 2:4": ste, "SR-STE 2:4": sr}
        self.add("## 3. Layer-wise SAD vs the initial mask (Figure 3b) and accuracy curves (Figure 4b)", "",
                 "SAD after the last epoch against the mask at initialisation; for the dense run, of the 2:4 "
                 "magnitude masks of its weights (what the paper compares STE with).", "")
        data = {label: layer_sad(self.runs, k) for label, k in series.items()}
        layers = list(dict.fromkeys(n for d in data.values() for n in d))
        if layers:
            self.add("| layer | " + " | ".join(series) + " |", "|---" * (len(series) + 1) + "|")
            for name in layers:
                cells = []
                for label in series:
                    mu, sd, n = data[label].get(name, (math.nan, math.nan, 0))
                    cells.append("" if not n else f"{100 * mu:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else " (n=1)"))
                self.add(f"| {name.removesuffix('.weight')} | " + " | ".join(cells) + " |")
            self.add("| **total** | " + " | ".join(self.sadcell(k) for k in series.values()) + " |", "")
        else:
            self.add("*(no finished run with SAD yet)*", "")
        self.figure(plots.layer_sad_bars(self.runs, series, self.figdir / "layer_sad.png",
                                         "Layer-wise SAD vs initial mask (ResNet, 2:4)"), "Layer-wise SAD")
        self.figure(plots.curves(self.runs, {"dense": dense, "STE 2:4": ste, "SR-STE 2:4": sr},
                                 [("test top-1 (%)", plots.acc_getter), ("train loss", lambda r: r["loss"]),
                                  ("SAD vs initial mask (%)", plots.sad_initial_getter)],
                                 self.figdir / "curves_dense_ste_srste.png", "ResNet: dense, STE and SR-STE at 2:4"),
                    "Accuracy curves of dense, STE and SR-STE")

    def transposable(self) -> None:
        u = TRANSPOSABLE_UPDATE_EVERY
        self.add("## 4. Transposable N:M vs plain N:M, same budget (Hubara et al.)", "",
                 f"All SR-STE, same epochs and data. Transposable masks are recomputed every {u} steps as in the "
                 f"paper; plain N:M is shown both with masks recomputed every step and every {u} steps.", "")
        if self.missing_transposable:
            self.add(f"**Transposable cells not run: {self.missing_transposable}.**", "")
        self.add("| N:M | plain, every step | plain, every 40 | transposable approx | transposable optimal |",
                 "|---|---|---|---|---|")
        series = {}
        for nm in TRANSPOSABLE_NMS:
            ks = [cell_key("resnet", nm, "srste"), cell_key("resnet", nm, "srste", update_every=u)]
            ks += [cell_key("resnet", nm, "srste", transposable=True, mask_method=mm, update_every=u) for mm in MASK_METHODS]
            self.add(f"| {nm} | " + " | ".join(self.acc(k) for k in ks) + " |")
            series.update({f"{nm} plain": ks[0], f"{nm} T-approx": ks[2], f"{nm} T-optimal": ks[3]})
        self.add("")
        rows = [(nm, {"plain": cell_key("resnet", nm, "srste"),
                      f"plain /{u}": cell_key("resnet", nm, "srste", update_every=u),
                      **{f"transposable {mm}": cell_key("resnet", nm, "srste", transposable=True, mask_method=mm,
                                                        update_every=u) for mm in MASK_METHODS}})
                for nm in TRANSPOSABLE_NMS]
        self.figure(plots.accuracy_bars(self.runs, rows, self.figdir / "transposable_accuracy.png",
                                        "Transposable vs plain N:M (ResNet, SR-STE)"), "Transposable vs plain")

    def demo(self) -> None:
        dense, sr = cell_key("resnet", "dense"), cell_key("resnet", "2:4", "srste")
        self.add("## Dense vs SR-STE 2:4 (the main job)", "",
                 "| run | top-1 | SAD vs initial 2:4 mask (%) |", "|---|---|---|",
                 f"| dense | {self.acc(dense)} | {self.sadcell(dense)} |",
                 f"| SR-STE 2:4 | {self.acc(sr)} | {self.sadcell(sr)} |", "",
                 "For the dense run, SAD is that of the 2:4 magnitude masks of its weights.", "")
        self.figure(plots.curves(self.runs, {"dense": dense, "SR-STE 2:4": sr},
                                 [("test top-1 (%)", plots.acc_getter), ("train loss", lambda r: r["loss"]),
                                  ("SAD vs initial mask (%)", plots.sad_initial_getter)],
                                 self.figdir / "demo_curves.png", "ResNet on Fashion-MNIST: dense vs SR-STE 2:4"),
                    "Dense vs SR-STE 2:4 over epochs")
        self.figure(plots.layer_sad_bars(self.runs, {"dense (magnitude 2:4)": dense, "SR-STE 2:4": sr},
                                         self.figdir / "demo_layer_sad.png", "Layer-wise SAD vs initial mask"),
                    "Layer-wise SAD")

    def cells(self) -> None:
        self.add("## Cells", "", "| run | status | top-1 | epochs |", "|---|---|---|---|")
        for rid, r in self.runs.items():
            m = r["metrics"]
            st = r["status"]
            if st != "done" and "transposable" in rid and self.missing_transposable:
                st = "not run (transposable masks missing)"
            acc = f"{as_percent(m[-1]['test_acc']):.2f}" if m else ""
            self.add(f"| {rid} | {st} | {acc} | {len(m) if m else ''} |")
        self.add("")


def write_report(out: str | os.PathLike, report_dir: str | os.PathLike | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``report_dir`` (default ``out``) from the grid in
    ``out``; also ``results.json`` (the per-epoch metrics of every finished run). Returns the path of
    report.md. Raises ValueError if ``out`` holds no grid, :class:`~nmsparse.plumbing.errors.LoadError` if its
    grid.json is damaged (nothing written either way)."""
    out = Path(out)
    grid = read_grid(out)
    if grid is None:
        raise ValueError(f"{out} holds no grid (no grid.json): run `nmsparse reproduce --out {out}` first")
    figdir = Path(report_dir) if report_dir is not None else out
    figdir.mkdir(parents=True, exist_ok=True)
    rep = _Report(out, figdir, grid)
    rep.header()
    rep.claims()
    for exp in rep.experiments:
        getattr(rep, exp)()
    rep.cells()
    path = figdir / "report.md"
    path.write_text("\n".join(rep.lines) + "\n")
    results = {rid: r["metrics"] for rid, r in rep.runs.items() if r["metrics"]}
    (figdir / "results.json").write_text(json.dumps({"grid": rep.grid, "runs": results}))
    return path
