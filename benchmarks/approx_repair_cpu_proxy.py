#!/usr/bin/env python3
"""CPU proxy for the CUDA route of approx transposable 2:4 masks: the former repair (gathers the short
tiles each round, reading the host) vs the current one (fixed rounds over every tile, no host read).

Counts aten ops (about one CUDA kernel launch each) and host reads (``item``, ``nonzero``; the current
path's one final ``.tolist()`` is not an aten op), checks that both give the same masks, and times both
interleaved on the CPU (median and range of the per-run ratio). Usage::

    PYTHONPATH=src python benchmarks/approx_repair_cpu_proxy.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nmsparse.masking import transposable as T

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func in READS
        return func(*args, **(kwargs or {}))


def former(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The torch route as it was: greedy, then the repair on the gathered short tiles."""
    a = T._tiles_of(w, m)
    x = T._greedy_torch(a, n, m)
    under = (x.flatten(1).sum(1) < n * m).nonzero().squeeze(1)
    if int(under.numel()):
        xs = x[under]
        bad = (~T._repair_torch(a[under], xs, n, m)).nonzero().squeeze(1)
        if int(bad.numel()):
            xs[bad] = T._solve_torch(a[under][bad], n, m)
        x[under] = xs
    return T._untile(x, w.shape, m)


def current(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    return T._torch_masks(w, n, m, True)[0]


def main() -> None:
    torch.manual_seed(0)
    fns = {"former": former, "current": current}
    for size in (1024, 2048):
        w = torch.randn(1, size, size)
        assert torch.equal(former(w), current(w))
        for name, f in fns.items():
            c = Count()
            with c:
                f(w)
            print(f"{size}x{size}: {name}: aten ops {c.ops}, host reads (item/nonzero) {c.reads}")
        runs: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(5):
            for name, f in fns.items():
                t = time.perf_counter()
                f(w)
                runs[name].append(time.perf_counter() - t)
        ratio = [c / f for c, f in zip(runs["current"], runs["former"])]
        print(f"{size}x{size}: CPU ms former {statistics.median(runs['former']) * 1e3:.0f}, current "
              f"{statistics.median(runs['current']) * 1e3:.0f}; current/former median {statistics.median(ratio):.2f} "
              f"(range {min(ratio):.2f}-{max(ratio):.2f})")


if __name__ == "__main__":
    main()
