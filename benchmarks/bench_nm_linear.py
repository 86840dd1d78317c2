"""NMLinear (packed N:M weight, numba kernel) against dense ``torch.nn.functional.linear``.

One run times, interleaved call by call (in a shuffled order each round), for each batch size: dense ``F.linear(x, W)``, the packed
kernel alone (``NMLinear`` with no fallback), ``NMLinear`` as shipped (kernel up to its crossover,
then the lazily cached dense weight) and ``NMLinear(cache_dense=False)`` (kernel, then
decompress-and-matmul on every call: the packed weight only in memory). Each variant's time in a run is the median of its calls; the script reports, over
``--runs`` runs, the median and range of ``dense_time / variant_time`` (> 1: faster than dense) and
the load average before each run (the machine may be shared). A weight of ``--size`` x ``--size``
(fp32: 64 MiB at 4096) fits in a large L3 cache: that is the situation measured.

    python benchmarks/bench_nm_linear.py --markdown
    python benchmarks/bench_nm_linear.py --markdown --kernel avx2            # the AVX2 kernel, this CPU's build
    python benchmarks/bench_nm_linear.py --markdown --haswell                # built for haswell, torch at AVX2

The kernel is the one ``NMLinear`` picks for this CPU (``--kernel`` forces one); "NMLinear (default)"
uses ``NMLinear.default_crossover`` for that kernel (no timing at conversion). ``--haswell`` reruns the
benchmark in a subprocess where numba compiles for an AVX2 + FMA CPU without AVX-512 and torch's
ATen, MKL and oneDNN stop at AVX2 (:func:`nmsparse.kernels.cpu_select.haswell_env`).
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

CONFIGS = {"2:4-fp32": (2, 4, torch.float32), "4:8-fp32": (4, 8, torch.float32), "2:4-bf16": (2, 4, torch.bfloat16)}
VARIANTS = ("kernel", "nmlinear", "no_cache")
HEADERS = {"kernel": "packed kernel only", "nmlinear": "NMLinear (default)", "no_cache": "NMLinear cache_dense=False"}


def layers(size: int, n: int, m: int, dtype: torch.dtype, variants=VARIANTS, seed: int = 0, kernel=None):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(size, size, generator=g))
        lin.weight.mul_(nmsparse.nm_mask(lin.weight, n, m))
    lin = lin.to(dtype)
    make = {"kernel": lambda: NMLinear.from_linear(lin, n, m, crossover=1 << 30, kernel=kernel),
            "nmlinear": lambda: NMLinear.from_linear(lin, n, m, kernel=kernel),
            "no_cache": lambda: NMLinear.from_linear(lin, n, m, cache_dense=False, kernel=kernel)}
    return lin.weight.detach(), {k: make[k]() for k in variants}


@torch.inference_mode()
def one_run(w, mods, batches, budget_s: float, dtype, clock=time.perf_counter) -> dict[int, dict[str, float]]:
    """Per batch size: dense_time / variant_time for each variant in ``mods`` (medians of interleaved calls)."""
    out = {}
    for b in batches:
        x = torch.randn(b, w.shape[1]).to(dtype)
        fns = {"dense": lambda: F.linear(x, w), **{k: (lambda mod=mod: mod(x)) for k, mod in mods.items()}}
        for f in fns.values():  # warm-up (compilation, caches)
            f()
        t0 = time.perf_counter()
        fns["dense"]()
        reps = int(min(40, max(5, budget_s / max(time.perf_counter() - t0, 1e-6) / len(fns))))
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for rep in range(reps):
            random.Random(rep).shuffle(order)  # no variant always runs right after the same other one
            for k in order:
                f = fns[k]
                t = clock()
                f()
                times[k].append(clock() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[b] = {k: med["dense"] / med[k] for k in mods} | {"dense_ms": med["dense"] * 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.6, help="seconds per batch size per run (sets the calls)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="which NMLinear variants to interleave with dense (fewer: a smaller working set in cache)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--kernel", default=None, help="auto (default), avx512, avx2, dense")
    ap.add_argument("--haswell", action="store_true", help="rerun compiled for haswell (AVX2+FMA), torch at AVX2")
    timing.add_args(ap)
    args = ap.parse_args()
    if args.haswell:
        env = {**os.environ, **cpu_select.haswell_env()}
        argv = [a for a in sys.argv[1:] if a != "--haswell"]
        sys.exit(subprocess.run([sys.executable, __file__, *argv], env=env).returncode)
    clock = timing.setup(ap, args)
    batches = [int(b) for b in args.batches.split(",")]
    variants = tuple(args.variants.split(","))
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {','.join(VARIANTS)}")
    cpu = cpu_select.host_cpu()
    print(f"CPU {cpu.name} ({cpu.isa()}), torch ATen {torch.backends.cpu.get_cpu_capability()}, size {args.size}, "
          f"threads {args.threads}, clock {args.clock}, runs {args.runs}")
    for name in args.configs.split(","):
        n, m, dtype = CONFIGS[name]
        w, mods = layers(args.size, n, m, dtype, variants, kernel=args.kernel)
        first = next(iter(mods.values()))
        print(f"{name}: kernel {first.path}, default crossover {NMLinear.default_crossover[first.path].get(dtype, 0)}")
        runs, loads = [], []
        for r in range(args.runs):
            loads.append(timing.load())
            runs.append(one_run(w, mods, batches, args.budget, dtype, clock))
            print(f"  {name} run {r + 1}/{args.runs} (load {loads[-1]}): "
                  + " ".join(f"b{b}:{runs[-1][b][variants[0]]:.2f}" for b in batches), flush=True)
        loads.append(timing.load())
        print(f"\n{name}, {args.size}x{args.size}, dense_time / time: median [min, max] over {args.runs} runs; "
              f"load average (1/5/15 min) before each run and at the end: {', '.join(loads)}")
        if args.markdown:
            print("\n| batch | dense ms (median) | " + " | ".join(HEADERS[k] for k in variants) + " |")
            print("|---:|---:|" + "---:|" * len(variants))
        for b in batches:
            cells = []
            for k in variants:
                vals = [run[b][k] for run in runs]
                cells.append(f"{statistics.median(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}]")
            dense_ms = statistics.median(run[b]["dense_ms"] for run in runs)
            if args.markdown:
                print(f"| {b} | {dense_ms:.2f} | " + " | ".join(cells) + " |")
            else:
                print(f"  batch {b:4d}: dense {dense_ms:8.2f} ms  " + "  ".join(f"{k} {c}" for k, c in zip(variants, cells)))
        print()


if __name__ == "__main__":
    main()
