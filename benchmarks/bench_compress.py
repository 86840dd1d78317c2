"""compress/decompress speed vs one plain ``w.abs()`` pass over the dense tensor (ratios; noisy machine).

Run: ``.venv/bin/python benchmarks/bench_compress.py [--size 4096] [--runs 7] [--threads 2]
[--nm 2:4,4:8] [--dtypes float32,float16,bfloat16] [--mmap-threshold BYTES] [--warm]``.

For each dtype and N:M, the three operations are timed interleaved (abs, compress, decompress, abs,
...) in each of ``--runs`` rounds, so load changes hit all three alike; each round's ratio is
compress/abs and decompress/abs of that round. Prints the median ratio and its range over the
rounds, the median abs() time, and the bytes written (values + index) against the dense bytes.
The weight is a random N:M tensor (``w * nm_mask(w, n, m)``), CPU.

Page faults: abs(), compress and decompress each allocate their output, and on Linux the first
write to freshly mapped memory costs a page fault per 4 KiB page, which at this size is a large part
of abs()'s time. glibc maps blocks above a *dynamic* threshold (it rises up to 32 MiB after frees),
so whether a 32 MiB output (4096x4096 fp16/bf16) is fresh memory or reused heap depends on what the
process freed before: abs() then takes ~25 or ~8 ms for the same tensor, and the ratios swing by 3x.
By default this script pins the threshold at 1 MiB (``--mmap-threshold``, glibc only) so every
output is fresh memory, as for a model loaded in a new process; ``--mmap-threshold 0`` keeps glibc's
default behaviour.
"""

import argparse
import ctypes
import ctypes.util
import os
import statistics
import time

import torch

from nmsparse import compress, decompress, nm_mask


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pin_mmap_threshold(nbytes: int) -> str:
    """Fix glibc's mmap threshold (disables its dynamic adjustment); returns what was done."""
    if nbytes <= 0:
        return "glibc default (dynamic) mmap threshold"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if libc.mallopt(-3, nbytes) == 1:  # M_MMAP_THRESHOLD
            return f"mmap threshold pinned at {nbytes} bytes (every large output is fresh memory)"
    except (OSError, AttributeError):
        pass
    return "mmap threshold NOT pinned (not glibc)"


def warm_ops(w, c):
    """abs into a preallocated tensor and the two CPU kernels into preallocated outputs (written once
    first, so no page faults are timed)."""
    from nmsparse.export import _kernels
    from nmsparse.masking.nm import _BITS

    int_dtype, abs_bits, _ = _BITS[w.dtype]
    n, m, b = c.n, c.m, c.bits
    dense, values, index = torch.empty_like(w), torch.empty_like(c.values), torch.empty_like(c.index)
    bits, vals, out = w.view(int_dtype).view(-1), values.view(int_dtype).view(-1), dense.view(int_dtype).view(-1)
    src = c.values.view(int_dtype).view(-1)
    ops = (lambda: torch.abs(w, out=dense), lambda: _kernels.compress_cpu(bits, vals, index, n, m, b, abs_bits),
           lambda: _kernels.decompress_cpu(src, c.index, out, n, m, b))
    for op in ops:
        op()
    assert torch.equal(dense, w) and torch.equal(index, c.index)
    return ops


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3, help="timings per operation per round (best kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nm", default="2:4,4:8", help="comma-separated N:M patterns (N kept of M)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated torch float dtypes")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20,
                    help="pin glibc's mmap threshold at this many bytes; 0 keeps the dynamic default")
    ap.add_argument("--warm", action="store_true",
                    help="no allocation, no page faults: abs(out=) against the CPU kernels writing into "
                         "preallocated outputs (the kernels' own speed against memory speed)")
    args = ap.parse_args()
    regime = pin_mmap_threshold(args.mmap_threshold)
    patterns = [tuple(int(x) for x in p.split(":")) for p in args.nm.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    torch.set_num_threads(args.threads)
    print(f"{args.size}x{args.size}, torch threads={torch.get_num_threads()}, {args.runs} interleaved rounds "
          f"(best of {args.inner} each), load average {os.getloadavg()[0]:.2f}; "
          f"{'warm: preallocated outputs, kernels only' if args.warm else regime}")
    print(f"{'dtype':<9}{'N:M':<6}{'abs ms':>8}{'compress/abs':>22}{'decompress/abs':>22}{'stored/dense':>14}")
    for dtype in dtypes:
        for n, m in patterns:
            w = torch.randn(args.size, args.size // m * m, generator=torch.Generator().manual_seed(0)).to(dtype)
            w = w * nm_mask(w, n, m)
            c = compress(w, n, m)
            assert torch.equal(decompress(c), w)
            ops = warm_ops(w, c) if args.warm else (w.abs, lambda: compress(w, n, m), lambda: decompress(c))
            t_abs, rc, rd = [], [], []
            for _ in range(args.runs):
                a, tc, td = (min(timed(op) for _ in range(args.inner)) for op in ops)
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
