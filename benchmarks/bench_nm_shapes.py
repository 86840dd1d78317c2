"""NMLinear kernel against dense ``F.linear`` across layer sizes: where does the packed kernel pay off?

For each square-ish 2:4 fp32 layer shape and each batch (rows of input), the packed kernel (no
fallback) and dense ``F.linear`` are called interleaved in a shuffled order; the cell is
dense_time / kernel_time (> 1: the kernel is faster), median [min, max] over ``--runs`` runs. This is
what ``to_nm_linear``'s ``min_weights`` default (2**21 weights) is read from: a weight that fits in
the CPU caches makes dense BLAS compute-bound and fast, a weight streamed from L3/DRAM makes the
product memory-bound, where reading 53% of the bytes wins.

    python benchmarks/bench_nm_shapes.py --threads 2 --runs 3
    python benchmarks/bench_nm_shapes.py --threads 2 --runs 3 --dtype bf16 --haswell

``--kernel`` forces a kernel (default: the one this CPU gets), ``--dtype bf16`` times bfloat16 layers,
``--haswell`` reruns compiled for an AVX2 + FMA CPU (torch at AVX2 too), as in bench_nm_linear.py.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import nmsparse
import timing
from nmsparse.kernels import NMLinear, cpu_select

SHAPES = "384x384,1536x384,384x1536,1024x1024,2048x1024,2048x2048,4096x4096"


def one_run(lin, mod, rows_list, reps, clock):
    out = {}
    for r in rows_list:
        x = torch.randn(r, lin.in_features).to(lin.weight.dtype)
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
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--kernel", default=None, help="auto (default), avx512, avx2")
    ap.add_argument("--haswell", action="store_true", help="rerun compiled for haswell (AVX2+FMA), torch at AVX2")
    timing.add_args(ap)
    args = ap.parse_args()
    if args.haswell:
        env = {**os.environ, **cpu_select.haswell_env()}
        argv = [a for a in sys.argv[1:] if a != "--haswell"]
        sys.exit(subprocess.run([sys.executable, __file__, *argv], env=env).returncode)
    clock = timing.setup(ap, args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows_list = [int(r) for r in args.rows.split(",")]
    cpu = cpu_select.host_cpu()
    print(f"CPU {cpu.name} ({cpu.isa()}), torch ATen {torch.backends.cpu.get_cpu_capability()}, {args.dtype}, "
          f"threads {args.threads}, clock {args.clock}, runs {args.runs}, load {timing.load()}")
    print("\n| weight (out x in) | kernel | fp32 MiB | " + " | ".join(f"{r} rows" for r in rows_list) + " |")
    print("|---|---|---:|" + "---:|" * len(rows_list))
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        lin = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.mul_(nmsparse.nm_mask(lin.weight, 2, 4))
        lin = lin.to(dtype)
        mod = NMLinear.from_linear(lin, 2, 4, crossover=1 << 30, kernel=args.kernel)
        x = torch.randn(1, in_f).to(dtype)
        t0 = time.perf_counter()
        F.linear(x, lin.weight)
        reps = int(min(400, max(10, args.budget / max(time.perf_counter() - t0, 1e-6) / 2)))
        runs = [one_run(lin, mod, rows_list, reps, clock) for _ in range(args.runs)]
        cells = []
        for r in rows_list:
            v = [run[r] for run in runs]
            cells.append(f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]")
        print(f"| {out_f}x{in_f} | {mod.path} | {out_f * in_f * 4 / 2**20:.1f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload at the end {timing.load()}")


if __name__ == "__main__":
    main()
