"""compress/decompress speed vs one plain ``w.abs()`` pass over the dense tensor (ratios; noisy machine).

Run: ``.venv/bin/python benchmarks/bench_compress.py [--size 4096] [--runs 7] [--threads 2]
[--nm 2:4,4:8] [--dtypes float32,float16,bfloat16]``.

For each dtype and N:M, the three operations are timed interleaved (abs, compress, decompress, abs,
...) in each of ``--runs`` rounds, so load changes hit all three alike; each round's ratio is
compress/abs and decompress/abs of that round. Prints the median ratio and its range over the
rounds, the median abs() time, and the bytes written (values + index) against the dense bytes.
The weight is a random N:M tensor (``w * nm_mask(w, n, m)``), CPU.
"""

import argparse
import os
import statistics
import time

import torch

from nmsparse import compress, decompress, nm_mask


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3, help="timings per operation per round (best kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nm", default="2:4,4:8", help="comma-separated N:M patterns (N kept of M)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated torch float dtypes")
    args = ap.parse_args()
    patterns = [tuple(int(x) for x in p.split(":")) for p in args.nm.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    torch.set_num_threads(args.threads)
    print(f"{args.size}x{args.size}, torch threads={torch.get_num_threads()}, {args.runs} interleaved rounds "
          f"(best of {args.inner} each), load average {os.getloadavg()[0]:.2f}")
    print(f"{'dtype':<9}{'N:M':<6}{'abs ms':>8}{'compress/abs':>22}{'decompress/abs':>22}{'stored/dense':>14}")
    for dtype in dtypes:
        for n, m in patterns:
            w = torch.randn(args.size, args.size // m * m, generator=torch.Generator().manual_seed(0)).to(dtype)
            w = w * nm_mask(w, n, m)
            c = compress(w, n, m)
            assert torch.equal(decompress(c), w)
            t_abs, rc, rd = [], [], []
            for _ in range(args.runs):
                a = min(timed(lambda: w.abs()) for _ in range(args.inner))
                tc = min(timed(lambda: compress(w, n, m)) for _ in range(args.inner))
                td = min(timed(lambda: decompress(c)) for _ in range(args.inner))
                t_abs.append(a)
                rc.append(tc / a)
                rd.append(td / a)

            def fmt(r):
                return f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"

            dense = w.numel() * w.element_size()
            name = str(dtype).replace("torch.", "")
            print(f"{name:<9}{n}:{m:<4}{statistics.median(t_abs) * 1e3:>8.1f}{fmt(rc):>22}{fmt(rd):>22}"
                  f"{c.nbytes / dense:>14.3f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
