"""FSDP2 vs DDP for N:M SR-STE training on the CPU (gloo): step time, time spent computing masks,
per-rank memory of sharded state against the (unsharded) masks, and the largest difference from
one process with the same global batch.

    torchrun --nproc_per_node=2 experiments/fsdp_bench.py [--dim 512] [--layers 4] [--steps 30] [--units root]

The set-ups (FSDP2 2:4 with shard-local masks, the default; FSDP2 2:4 with masks from the gathered
weight, ``shard(masks="gathered")``; FSDP2 dense; DDP 2:4) take their steps interleaved, round by round,
so that load on the machine hits them alike; medians are printed by rank 0.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import nmsparse
from nmsparse.training import fsdp

MASK_SECONDS = [0.0]


def _timed(fn, weight):
    t = time.perf_counter()
    out = fn(weight)
    MASK_SECONDS[0] += time.perf_counter() - t
    return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def net(dim: int, layers: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(dim, dim), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(dim, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--units", choices=("layers", "root"), default="layers",
                    help="FSDP2 all-gather groups: each Linear (nmsparse's default for sparse layers) or the root only")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = net(a.dim, a.layers)
    sparse = copy.deepcopy(base)
    nmsparse.sparsify(sparse, 2, 4, keep_dense=())
    reference = copy.deepcopy(sparse)  # one process, the whole batch (rank 0 only)
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(sparse))
    def units(model):
        return [m for m in model if isinstance(m, nn.Linear)] if a.units == "layers" else []

    sharded = copy.deepcopy(sparse)
    fsdp.shard(sharded, units=units(sharded))  # shard-local masks
    gathered = copy.deepcopy(sparse)
    fsdp.shard(gathered, units=units(gathered), masks="gathered")
    for model in (sharded, gathered):
        for _, _, p in nmsparse.sparse_layers(model):
            p.mask_fn = functools.partial(_timed, p.mask_fn)
    dense = copy.deepcopy(base)
    fsdp.shard(dense, units=units(dense))
    models = {"fsdp 2:4": sharded, "fsdp 2:4 gathered": gathered, "fsdp dense": dense, "ddp 2:4": ddp}
    if rank == 0:
        models["one process 2:4"] = reference
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    mask_share: dict[str, list[float]] = {"fsdp 2:4": [], "fsdp 2:4 gathered": []}
    g = torch.Generator().manual_seed(1)
    part = slice(rank * a.batch // world, (rank + 1) * a.batch // world)
    for step in range(a.steps):
        x, y = torch.randn(a.batch, a.dim, generator=g), torch.randint(0, 10, (a.batch,), generator=g)
        for k, model in models.items():
            xb, yb = (x, y) if k.startswith("one") else (x[part], y[part])
            if not k.startswith("one"):
                dist.barrier()
            MASK_SECONDS[0] = 0.0
            t = time.perf_counter()
            loss = nn.functional.cross_entropy(model(xb), yb)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            dt = time.perf_counter() - t
            if step >= 3:  # warm-up steps not counted
                times[k].append(dt)
                if k in mask_share:
                    mask_share[k].append(MASK_SECONDS[0] / dt)
    full = fsdp.full_state_dict(sharded)
    full_gathered = fsdp.full_state_dict(gathered)
    state_bytes = sum(_local(p).numel() * 4 * 3 for p in sharded.parameters())  # weights, grads, momentum
    mask_bytes = {name: sum(_local(p.mask).numel() for _, _, p in nmsparse.sparse_layers(model))
                  for name, model in (("local", sharded), ("gathered", gathered))}
    ddp_bytes = sum(p.numel() * 4 * 3 for p in ddp.parameters())
    if rank == 0:
        ref = reference.state_dict()
        diff = {n: max(float((f[k].float() - ref[k].float()).abs().max()) for k in ref)
                for n, f in (("local", full), ("gathered", full_gathered))}
        masks_equal = {n: all(torch.equal(f[k], ref[k]) for k in ref if k.endswith(".mask"))
                       for n, f in (("local", full), ("gathered", full_gathered))}
        print(f"{world} processes, {a.layers} x Linear({a.dim}, {a.dim}) + Linear({a.dim}, 10), 2:4 SR-STE, "
              f"global batch {a.batch}, FSDP units: {a.units}, {a.steps - 3} timed steps (median, min-max):")
        for k, ts in times.items():
            print(f"  {k:16s} {statistics.median(ts) * 1e3:8.1f} ms  ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})")
        med = {k: statistics.median(ts) for k, ts in times.items()}
        print(f"  fsdp 2:4 / ddp 2:4 step time: {med['fsdp 2:4'] / med['ddp 2:4']:.2f}; "
              f"fsdp 2:4 / fsdp dense: {med['fsdp 2:4'] / med['fsdp dense']:.2f}")
        print(f"  fsdp 2:4 (local masks) / fsdp 2:4 gathered: {med['fsdp 2:4'] / med['fsdp 2:4 gathered']:.2f}")
        for k, share in mask_share.items():
            print(f"  mask computation: {statistics.median(share):.1%} of an {k} step (median)")
        print(f"  per-rank bytes: FSDP weights+grads+momentum {state_bytes / 2**20:.2f} MiB, masks local "
              f"{mask_bytes['local'] / 2**20:.2f} MiB, gathered (whole) {mask_bytes['gathered'] / 2**20:.2f} MiB; "
              f"DDP weights+grads+momentum {ddp_bytes / 2**20:.2f} MiB")
        for n in diff:
            print(f"  FSDP ({n} masks) vs one process after {a.steps} steps: max |difference| {diff[n]:.3g}, "
                  f"masks equal: {masks_equal[n]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
