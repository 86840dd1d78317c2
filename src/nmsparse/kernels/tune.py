"""Measured crossovers: up to which batch the N:M kernel beats dense ``F.linear`` for one layer, on this CPU.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.

Where the packed kernel wins depends on the CPU (cache sizes, memory bandwidth, its BLAS), the layer's
shape and dtype, and the thread count, so :func:`nmsparse.to_nm_linear` times it instead of trusting a
constant from one machine (as TensorRT picks kernels): for batches 1, 2, 4, 8, 16, 32 it calls the
kernel and ``F.linear`` on the dense weight, interleaved (the fastest of 5-15 calls each, a losing
batch timed twice), and keeps the largest batch up to which the
kernel is at least ``MARGIN`` times as fast at every step. A kernel that loses already at batch 1
leaves the layer dense. Results are cached per CPU, kernel, shape, n:m, dtype and thread count for the
life of the process, so a model with many equal layers is timed once per shape.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F

from nmsparse.kernels import cpu_select, nm_op

LADDER = (1, 2, 4, 8, 16, 32)
MARGIN = 1.05  # dense_time / kernel_time needed to count as a win (timing noise must not convert a loser)
BUDGET_S = 0.02  # seconds of dense calls per batch size (sets the repetitions, 5 to 15)


@dataclasses.dataclass(frozen=True)
class Measured:
    """``crossover``: the largest batch of the ladder up to which the kernel won at every step (0: never);
    ``ratios``: dense_time / kernel_time per batch timed (the ladder stops at the first loss)."""

    crossover: int
    ratios: dict


_CACHE: dict[tuple, Measured] = {}


def cache_key(path: str, shape: tuple[int, int], n: int, m: int, dtype: torch.dtype) -> tuple:
    cpu = cpu_select.host_cpu()
    return (cpu.name, hash(cpu.features), path, tuple(shape), n, m, dtype, torch.get_num_threads())


def clear_cache() -> None:
    """Forget every measurement (the next conversion times again)."""
    _CACHE.clear()


def wall_timer(kind: str, batch: int, fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (``kind``: ``"dense"`` or ``"kernel"``; tests pass a fake timer)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


Timer = Callable[[str, int, Callable[[], object]], float]


def _fastest(f_dense: Callable, f_kernel: Callable, batch: int, reps: int, timer: Timer) -> tuple[float, float]:
    times: dict[str, list[float]] = {"dense": [], "kernel": []}
    for r in range(reps):  # alternate the order: neither always runs right after the other
        for kind in (("dense", "kernel") if r % 2 else ("kernel", "dense")):
            times[kind].append(timer(kind, batch, f_dense if kind == "dense" else f_kernel))
    # the fastest call of each: interference from other work only ever adds time
    return min(times["dense"]), min(times["kernel"])


@torch.inference_mode()
def measure(weight: torch.Tensor, layer, *, ladder: tuple[int, ...] = LADDER, margin: float = MARGIN,
            budget_s: float = BUDGET_S, timer: Timer | None = None, use_cache: bool = True) -> Measured:
    """Time ``layer`` (an :class:`~nmsparse.kernels.NMLinear`, its own kernel) against ``F.linear`` with
    the dense ``weight`` ``(out, in)`` of the same dtype, batch by batch along ``ladder``."""
    timer = timer or wall_timer
    path = layer.path
    key = cache_key(path, tuple(weight.shape), layer.n, layer.m, weight.dtype)
    if use_cache and key in _CACHE:
        return _CACHE[key]
    ratios: dict[int, float] = {}
    crossover = 0
    if path != "dense":
        arrays = layer._kernel_arrays()
        gen = torch.Generator().manual_seed(0)
        for b in ladder:
            x = torch.randn(b, weight.shape[1], generator=gen).to(weight.dtype)
            f_dense = lambda: F.linear(x, weight, layer.bias)  # noqa: E731
            f_kernel = lambda: nm_op.linear_impl(x, layer.values, layer.masks, layer.bias, layer.n, layer.m,  # noqa: E731
                                                 layer.in_features, path, arrays)
            f_kernel(), f_dense()  # warm-up: compilation, caches
            reps = int(min(15, max(5, budget_s / max(timer("dense", b, f_dense), 1e-7))))
            td, tk = _fastest(f_dense, f_kernel, b, reps, timer)
            ratios[b] = td / max(tk, 1e-12)
            if ratios[b] < margin:  # once more before giving up (a burst of other work on a shared machine)
                td, tk = _fastest(f_dense, f_kernel, b, reps, timer)
                ratios[b] = max(ratios[b], td / max(tk, 1e-12))
            if ratios[b] < margin:
                break
            crossover = b
    result = Measured(crossover, ratios)
    if use_cache:
        _CACHE[key] = result
    return result


def dense_reason(shape: tuple[int, int], dtype: torch.dtype, path: str, m: Measured) -> str:
    """The report's reason for a layer the kernel never beat."""
    cpu = cpu_select.host_cpu()
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    got = ", ".join(f"batch {b} {r:.2f}x" for b, r in m.ratios.items())
    return (f"dense is faster for {shape[0]}x{shape[1]} {name} on this CPU ({cpu.name}): the {path} kernel ran "
            f"at {got} dense speed when measured at conversion (needs {MARGIN:.2f}x at batch 1)")
