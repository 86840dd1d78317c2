"""Transposable N:M masks: time and kept-|w| fraction of plain N:M, the completed 2-approximation and
the exact optimum, on random fp32 matrices (what docs/transposable.md reports).

Run: ``make bench`` or ``.venv/bin/python benchmarks/bench_transposable.py [--sizes 1024 4096]
[--nm 2:4 4:8 8:16] [--repeat 3] [--markdown]``.

Times are the best of ``--repeat`` runs after one warm-up call (numba compiles once per dtype and caches
to disk), wall clock and process CPU time (all threads). The machine may be shared: CPU time per wall
second shows how much of the 2 cores the run actually got. ``short`` is the share of tiles the greedy
left with a row under N (completed by augmenting paths), ``exact`` the number of those re-solved exactly.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nmsparse import is_nm, is_transposable_nm, nm_mask, transposable_mask
from nmsparse.masking.transposable import transposable_stats


def best_of(fn, repeat):
    out = fn()  # warm-up (compiles on first use)
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--nm", nargs="+", default=["2:4", "4:8", "8:16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"random N(0,1) fp32 matrices, torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
        f"load average {load:.1f}, best of {args.repeat}"
    )
    rows = []
    for size in args.sizes:
        w = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
        total = float(w.abs().double().sum())
        for nm in args.nm:
            n, m = map(int, nm.split(":"))
            (t, c), mask = best_of(lambda: nm_mask(w, n, m), args.repeat)
            assert is_nm(mask, n, m)
            kept = float(w.abs().double()[mask].sum()) / total
            rows.append((size, nm, "plain N:M", t, c, kept, is_transposable_nm(mask, n, m), "", ""))
            for method in ("approx", "optimal"):
                (t, c), tmask = best_of(lambda: transposable_mask(w, n, m, method), args.repeat)
                st = transposable_stats(w, n, m, method)  # the same mask, with diagnostics (untimed)
                assert torch.equal(st["mask"], tmask) and is_transposable_nm(tmask, n, m)
                short = f"{st['short'] / st['tiles']:.1%}" if method == "approx" else ""
                exact = str(st["exact"]) if method == "approx" else ""
                rows.append((size, nm, method, t, c, st["kept_abs"] / total, True, short, exact))
            print(".", end="", flush=True)
    print()
    if args.markdown:
        print("| size | N:M | mask | wall s | CPU s | kept \\|w\\| | transposable | greedy short | exact |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size, nm, method, t, c, kept, tr, short, exact in rows:
            print(
                f"| {size}x{size} | {nm} | {method} | {t:.3f} | {c:.3f} | {kept:.4f} | "
                f"{'yes' if tr else 'no'} | {short} | {exact} |"
            )
    else:
        head = ("size", "N:M", "mask", "wall s", "CPU s", "kept|w|", "T", "short", "exact")
        print("{:>6} {:<5} {:<10} {:>8} {:>8} {:>8} {:>3} {:>7} {:>6}".format(*head))
        for size, nm, method, t, c, kept, tr, short, exact in rows:
            print(
                f"{size:>6} {nm:<5} {method:<10} {t:>8.3f} {c:>8.3f} {kept:>8.4f} "
                f"{'y' if tr else 'n':>3} {short:>7} {exact:>6}"
            )


if __name__ == "__main__":
    main()
