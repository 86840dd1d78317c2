#!/usr/bin/env python3
"""CPU proxy for the CUDA approx 2:4 path (the torch route): the former repair (gathers the short tiles
each round, host reads) vs the current one
(fixed rounds over all tiles). Counts aten ops (~ CUDA kernel launches) and host reads (item, nonzero;
the current path's one .tolist() is not an aten op), checks equal masks, times both interleaved on the CPU.

    PYTHONPATH=src python benchmarks/approx_repair_cpu_proxy.py
"""
import statistics, time, torch
from torch.utils._python_dispatch import TorchDispatchMode
from nmsparse import transposable as T

class Count(TorchDispatchMode):
    def __init__(self): super().__init__(); self.ops = 0; self.syncs = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default): self.syncs += 1
        return func(*args, **(kwargs or {}))

def old(w, n=2, m=4):
    a = T._tiles_of(w, m)
    x = T._greedy_torch(a, n, m)
    under = (x.flatten(1).sum(1) < n * m).nonzero().squeeze(1)
    if int(under.numel()):
        xs = x[under]
        good = T._repair_torch(a[under], xs, n, m)
        bad = (~good).nonzero().squeeze(1)
        if int(bad.numel()):
            xs[bad] = T._solve_torch(a[under][bad], n, m)
        x[under] = xs
    return T._untile(x, w.shape, m)

def new(w, n=2, m=4):
    return T._torch_masks(w, n, m, True)[0]

torch.manual_seed(0)
for size in (1024, 2048):
    w = torch.randn(1, size, size)
    assert torch.equal(old(w), new(w))
    for name, f in (("old", old), ("new", new)):
        c = Count()
        with c: f(w)
        print(f"{size}: {name}: aten ops {c.ops}, host reads (item/nonzero) {c.syncs}")
    runs = {"old": [], "new": []}
    for _ in range(5):
        for name, f in (("old", old), ("new", new)):
            t = time.perf_counter(); f(w); runs[name].append(time.perf_counter() - t)
    r = [o / n_ for o, n_ in zip(runs["old"], runs["new"])]
    print(f"{size}: CPU ms old {statistics.median(runs['old'])*1e3:.0f}, new {statistics.median(runs['new'])*1e3:.0f}; "
          f"new/old median {1/statistics.median(r):.2f} (range {1/max(r):.2f}-{1/min(r):.2f})")
