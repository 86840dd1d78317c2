"""NMLinear kernel against dense ``F.linear`` across layer sizes: where does the packed kernel pay off?

For each square-ish 2:4 fp32 layer shape and each batch (rows of input), the packed kernel (no
fallback) and dense ``F.linear`` are called interleaved in a shuffled order; the cell is
dense_time / kernel_time (> 1: the kernel is faster), median [min, max] over ``--runs`` runs. This is
what ``to_nm_linear``'s ``min_weights`` default (2**21 weights) is read from: a weight that fits in
the CPU caches makes dense BLAS compute-bound and fast, a weight streamed from L3/DRAM makes the
product memory-bound, where reading 53% of the bytes wins.

    python benchmarks/bench_nm_shapes.py --threads 2 --runs 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import nmsparse
import timing
from nmsparse.kernels import NMLinear

SHAPES = "384x384,1536x384,384x1536,1024x1024,2048x1024,2048x2048,4096x4096"


def one_run(lin, mod, rows_list, reps, clock):
    out = {}
    for r in rows_list:
        x = torch.randn(r, lin.in_features)
        fns = {"dense": lambda: F.linear(x, lin.weight, lin.bias), "kernel": lambda: mod(x)}
        for f in fns.values():
            f()
        t = {k: [] for k in fns}
        for rep in range(reps):
            for k in random.Random(rep).sample(list(fns), 2):
                t0 = clock()
                fns[k]()
                t[k].append(clock() - t0)
        out[r] = statistics.median(t["dense"]) / statistics.median(t["kernel"])
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="out x in, comma-separated")
    ap.add_argument("--rows", default="1,2,4,8,12,16,24")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per shape and row count per run")
    timing.add_args(ap)
    args = ap.parse_args()
    clock = timing.setup(ap, args)
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"threads {args.threads}, clock {args.clock}, runs {args.runs}, "
          f"load {timing.load()}")
    print("\n| weight (out x in) | fp32 MiB | " + " | ".join(f"{r} rows" for r in rows_list) + " |")
    print("|---|---:|" + "---:|" * len(rows_list))
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        lin = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.mul_(nmsparse.nm_mask(lin.weight, 2, 4))
        mod = NMLinear.from_linear(lin, 2, 4, crossover=1 << 30)
        x = torch.randn(1, in_f)
        t0 = time.perf_counter()
        F.linear(x, lin.weight)
        reps = int(min(400, max(10, args.budget / max(time.perf_counter() - t0, 1e-6) / 2)))
        runs = [one_run(lin, mod, rows_list, reps, clock) for _ in range(args.runs)]
        cells = []
        for r in rows_list:
            v = [run[r] for run in runs]
            cells.append(f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]")
        print(f"| {out_f}x{in_f} | {out_f * in_f * 4 / 2**20:.1f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload at the end {timing.load()}")


if __name__ == "__main__":
    main()
