"""``nmsparse reproduce``: run the papers' claims as a grid of training runs and write a report.

``nmsparse reproduce --demo`` is the main job: dense vs SR-STE 2:4 on Fashion-MNIST, 2 epochs each,
printing the comparison table and the paths of the report and plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nmsparse.cli.help import fail
from nmsparse.plumbing import progress
from nmsparse.reproduce.grid import EXPERIMENTS, NMS, Cell, Scale, build_grid, check_experiments, demo_cells
from nmsparse.reproduce.results import as_percent, load_runs
from nmsparse.reproduce.runner import run_grid


def write_report(out, report_dir=None):  # imported lazily: matplotlib is slow to import
    from nmsparse.reproduce.report import write_report as write

    return write(out, report_dir)

# --quick: the whole grid's structure at a size that runs in under 10 minutes on 2 cores.
QUICK = dict(epochs=1, seeds=(0,), train_subset=1024, test_subset=1000, nms=("2:4", "1:8"))
# --demo: 2 epochs of dense and SR-STE 2:4; a training subset keeps it under 5 minutes on 2 cores.
DEMO = dict(epochs=2, seeds=(0,), train_subset=None, test_subset=None)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        if "," in text:
            return tuple(int(s) for s in text.split(","))
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3 means seeds 0,1,2) or a list like 0,1,2, got {text!r}")
    if k < 1:
        raise argparse.ArgumentTypeError(f"--seeds must be >= 1, got {k}")
    return tuple(range(k))


def _experiments(text: str) -> list[str]:
    try:
        return check_experiments(s.strip() for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _nms(text: str) -> tuple[str, ...]:
    nms = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in nms if s not in NMS]
    if bad or not nms:
        raise argparse.ArgumentTypeError(f"--nms takes a comma list from {','.join(NMS)}, got {text!r}")
    return nms


def _shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/K like 1/2, got {text!r}")
    if not 1 <= i <= k:
        raise argparse.ArgumentTypeError(f"--shard I/K needs 1 <= I <= K, got {text!r}")
    return i, k


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="train the SR-STE / transposable-mask claims as a grid and write report.md with plots",
        description="Runs the papers' experiments on Fashion-MNIST (ResNet; ViT for 2:4) over several seeds, "
        "each run in OUT/runs/<run id>/, and writes OUT/report.md with tables (mean ± std over seeds) and PNG "
        "plots. Re-running the same command continues a partly done grid: finished runs are skipped, runs "
        "killed after an epoch resume from their checkpoint. Experiments: "
        + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()),
    )
    p.add_argument("--out", default=None, help="grid folder (default runs/reproduce, runs/reproduce-quick with "
                   "--quick, runs/demo with --demo)")
    p.add_argument("--quick", action="store_true", help="a reduced grid (1 seed, 1 epoch, 1024 training images, "
                   "N:M 2:4 and 1:8) that runs in under 10 minutes")
    p.add_argument("--demo", action="store_true", help="the main job: dense vs SR-STE 2:4, 2 epochs each, "
                   "prints the comparison table and the report path")
    p.add_argument("--experiments", type=_experiments, default=None,
                   help=f"comma list from {','.join(EXPERIMENTS)} (default all)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; 1 with --quick)")
    p.add_argument("--seeds", type=_seeds, default=None, help="number of seeds (3 means 0,1,2; default 3, 1 with "
                   "--quick) or an explicit list like 0,1,2")
    p.add_argument("--nms", type=_nms, default=None, help=f"N:M settings of the accuracy table (default {','.join(NMS)})")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first K training images (default all)")
    p.add_argument("--test-subset", type=int, default=None, help="test on the first K test images (default all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default the trainer's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default torch's)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/K",
                   help="run only every K-th run starting at the I-th (1-based), so K processes can share a "
                   "grid folder; the report covers the whole grid")
    p.add_argument("--report-dir", default=None, help="write report.md and plots here (default OUT)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the runs in OUT")
    p.add_argument("--list", action="store_true", help="print the grid's runs and their status, train nothing")
    progress.add_argument(p, "progress within each run's epochs (each epoch's summary line stays)")
    p.set_defaults(func=main)


def _error(msg: str) -> int:
    return fail("reproduce", msg)


def _scale(args: argparse.Namespace) -> Scale:
    preset = DEMO if args.demo else QUICK if args.quick else {}
    fields = dict(preset)
    for name in ("epochs", "seeds", "train_subset", "test_subset", "nms"):
        v = getattr(args, name)
        if v is not None:
            fields[name] = v
    return Scale(**fields, batch_size=args.batch_size, data_dir=args.data_dir, threads=args.threads)


def main(args: argparse.Namespace) -> int:
    if args.demo and (args.quick or args.experiments):
        return _error("--demo runs its own two runs: drop --quick / --experiments")
    out = Path(args.out or ("runs/demo" if args.demo else "runs/reproduce-quick" if args.quick else "runs/reproduce"))
    try:
        if args.report_only:
            path = write_report(out, args.report_dir)
            print(f"report: {path}")
            return 0
        mode = progress.from_args(args)
        scale = _scale(args)
        experiments = ["demo"] if args.demo else (args.experiments or list(EXPERIMENTS))
        cells = demo_cells(scale) if args.demo else build_grid(experiments, scale)
    except ValueError as e:
        return _error(str(e))
    if args.list:
        return _list(cells, scale, out)
    t0 = time.perf_counter()
    try:
        outcomes = run_grid(cells, scale, out, experiments=experiments, progress=mode, shard=args.shard,
                            command="nmsparse " + " ".join(sys.argv[1:]) if sys.argv[1:] else None)
    except ValueError as e:
        return _error(str(e))
    path = write_report(out, args.report_dir)
    wall = time.perf_counter() - t0
    if args.demo:
        _print_demo(cells, scale, out, wall)
    else:
        counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "resumed", "done", "failed", "not run")}
        print(f"{len(outcomes)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" in {wall / 60:.1f} min")
    figs = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report: {path}")
    print(f"plots:  {', '.join(str(path.parent / f) for f in figs) or 'none'}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _list(cells: list[Cell], scale: Scale, out: Path) -> int:
    runs = load_runs(out, [c.run_id for c in cells], scale.epochs)
    for c in cells:
        print(f"{runs[c.run_id]['status']:>8}  {c.run_id}")
    print(f"{len(cells)} runs of {scale.epochs} epochs in {out}/runs")
    return 0


def _print_demo(cells: list[Cell], scale: Scale, out: Path, wall: float) -> None:
    runs = load_runs(out, [c.run_id for c in cells], scale.epochs)
    subset = (f"first {scale.train_subset} of 60,000 training images" if scale.train_subset
              else "all 60,000 training images")
    print(f"\nFashion-MNIST, ResNet, {scale.epochs} epochs, {subset}, seed {scale.seeds[0]}")
    print(f"{'run':<16}{'test top-1':>11}{'train loss':>12}{'s/epoch':>9}  SAD vs initial 2:4 mask")
    for c in cells:
        m = runs[c.run_id]["metrics"]
        label = "dense" if c.settings["nm"] == "dense" else f"SR-STE {c.settings['nm']}"
        if not m:
            print(f"{label:<16}{runs[c.run_id]['status']:>11}")
            continue
        last = m[-1]
        secs = sum(r.get("time", 0) for r in m) / len(m)
        sad = last.get("sad")
        s = "-" if not sad else f"{sad['total']['vs_initial']} of {sad['total']['size']} ({100 * sad['total']['vs_initial_frac']:.2f}%)"
        print(f"{label:<16}{as_percent(last['test_acc']):>10.2f}%{last['loss']:>12.4f}{secs:>8.1f}s  {s}")
    print(f"(dense: SAD of its weights' 2:4 magnitude masks; wall time {wall:.0f}s)")
