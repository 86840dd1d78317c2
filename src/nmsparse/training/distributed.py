"""Multi-process training with ``torchrun``: DistributedDataParallel, gloo on CPU, nccl on CUDA.

``torchrun --nproc_per_node=2 -m nmsparse train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them. Without them (or with
``WORLD_SIZE=1``) training runs in one process and none of this is used.

Masks stay identical on every rank without communication of their own: DDP averages the gradients,
every rank applies the same update to the same weights, and the mask is a deterministic function of
the weights. :func:`check_same` verifies this at the end of every epoch (a checksum all-gathered).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(name)


def setup(device: str = "cpu") -> Context:
    """Join the process group described by torchrun's environment, if any."""
    world = env_world_size()
    if world <= 1:
        return Context(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        created = True
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def teardown(ctx: Context) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(ctx: Context, values: Iterable[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64)."""
    vals = list(values)
    if not ctx.distributed:
        return vals
    t = torch.tensor(vals, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: Context, obj: object) -> object:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checksum(tensors: Iterable[torch.Tensor]) -> float:
    """An order-sensitive float64 digest of some tensors (equal tensors give equal digests)."""
    total = 0.0
    for i, t in enumerate(tensors):
        x = t.detach().double().flatten()
        w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).remainder_(97).add_(1)
        total += (i + 1) * float((x * w).sum())
    return total


def check_same(ctx: Context, tensors: Iterable[torch.Tensor], what: str) -> None:
    """Raise RuntimeError when ``tensors`` differ between ranks (compared by checksum)."""
    if not ctx.distributed:
        return
    c = torch.tensor([checksum(tensors)], dtype=torch.float64, device=ctx.device)
    gathered = [torch.zeros_like(c) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, c)
    vals = [float(g) for g in gathered]
    if any(v != vals[0] for v in vals):
        raise RuntimeError(f"{what} differ between ranks (checksums {vals})")
