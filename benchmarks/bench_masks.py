"""nm_mask speed vs one plain ``w.abs()`` pass, measured in one run (ratios; the machine is noisy).

Run: ``make bench`` or ``.venv/bin/python benchmarks/bench_masks.py [--size 4096] [--repeat 15]``.
Also times the argsort-per-group approach of the original SR-STE code, for scale.
"""

import argparse
import time

import torch

from nmsparse import nm_mask


def best_of(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def argsort_mask(w, n, m):  # the SR-STE reference code's approach
    g = w.abs().reshape(-1, m)
    idx = torch.argsort(g, dim=1)[:, : m - n]
    return torch.ones_like(g).scatter_(1, idx, 0).reshape(w.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"{args.size}x{args.size} fp32, torch threads={torch.get_num_threads()}, best of {args.repeat}")
    print(f"{'N:M':<6}{'abs() ms':>10}{'nm_mask ms':>12}{'ratio':>8}{'argsort ms':>12}{'ratio':>8}")
    for n, m in [(2, 4), (4, 8), (1, 4), (8, 16)]:
        t_abs = best_of(lambda: w.abs(), args.repeat)
        t_nm = best_of(lambda: nm_mask(w, n, m), args.repeat)
        t_sort = best_of(lambda: argsort_mask(w, n, m), max(3, args.repeat // 5))
        print(f"{n}:{m:<4}{t_abs*1e3:>10.1f}{t_nm*1e3:>12.1f}{t_nm/t_abs:>8.2f}{t_sort*1e3:>12.1f}{t_sort/t_abs:>8.2f}")


if __name__ == "__main__":
    main()
