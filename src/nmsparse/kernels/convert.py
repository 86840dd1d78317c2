"""``to_nm_linear``: swap a model's finalized N:M ``nn.Linear`` layers for packed :class:`NMLinear` ones.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse.kernels import cpu_nm, cpu_select, tune as tuning
from nmsparse.kernels.nm_linear import NMLinear, check_crossover, unsupported_reason
from nmsparse.masking.pattern import NMPattern, check_nm

AUTO_MAX_DENSITY = 0.75  # auto-detection converts n:m only when n/m <= this (else packing saves little)
# Without timing (tune=False), layers with fewer weights stay dense by default: such a weight (16 MiB in
# fp32) sits in the CPU's caches, where dense BLAS is compute-bound and as fast as or faster than the
# packed kernel (measured with benchmarks/bench_nm_shapes.py on a Sapphire Rapids, docs/inference.md:
# 2 threads, 384x384 to 2048x1024 run at 0.3-1.3x dense at 1-24 rows; 4096x4096 at 1.05-1.64x).
DEFAULT_MIN_WEIGHTS = 1 << 22
TUNE_ENV = "NMSPARSE_NM_TUNE"  # "0": to_nm_linear's default is tune=False (reproducible runs, tests)


@dataclasses.dataclass
class ConvertedLayer:
    """One weight-bearing module: converted to ``NMLinear`` with ``nm``, or left dense with ``reason``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    converted: bool
    nm: str | None = None
    reason: str = ""
    dense_bytes: int = 0
    packed_bytes: int = 0
    kernel: str = ""
    crossover: int | None = None
    measured: dict | None = None  # batch -> dense_time / kernel_time, when timed at conversion


@dataclasses.dataclass
class NMLinearReport:
    """What :func:`to_nm_linear` did, layer by layer (printable, like ``SparsityReport``)."""

    layers: list[ConvertedLayer]
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def converted(self) -> list[ConvertedLayer]:
        return [e for e in self.layers if e.converted]

    @property
    def dense(self) -> list[ConvertedLayer]:
        return [e for e in self.layers if not e.converted]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "layers": [dataclasses.asdict(e) for e in self.layers]}

    def table(self) -> str:
        rows = [("layer", "type", "shape", "weight bytes", "NMLinear")]
        for e in self.layers:
            size = f"{e.dense_bytes} -> {e.packed_bytes}" if e.converted else str(e.dense_bytes)
            how = f"packed {e.nm}, {e.kernel} kernel up to {e.crossover} rows" + (
                " (measured)" if e.measured else "") + ", dense F.linear above"
            rows.append((e.name, e.kind, "x".join(map(str, e.shape)), size,
                         how if e.converted else f"dense: {e.reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        before = sum(e.dense_bytes for e in self.converted)
        after = sum(e.packed_bytes for e in self.converted)
        lines.append(f"{len(self.converted)} converted, {len(self.dense)} dense; converted weights "
                     f"{before} -> {after} bytes ({after / max(before, 1):.1%})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _detect(counts_by_m: dict[int, int]) -> tuple[int, int] | None:
    """The n:m with the fewest stored values per weight (ties: smaller m) among m's with n < m."""
    best = None
    for m, n in counts_by_m.items():
        n = max(n, 1)
        if n < m and n / m <= AUTO_MAX_DENSITY and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def _entry(name: str, mod: nn.Module) -> ConvertedLayer:
    w = mod.weight
    return ConvertedLayer(name, type(mod).__name__, tuple(w.shape), False,
                          dense_bytes=w.numel() * w.element_size())


def to_nm_linear(model: nn.Module, n: int | None = None, m: int | None = None, *,
                 crossover: int | None = None, cache_dense: bool = True,
                 min_weights: int | None = None, kernel: str | None = None,
                 tune: bool | None = None) -> NMLinearReport:
    """Replace, in place, every finalized N:M ``nn.Linear`` of ``model`` by an :class:`NMLinear`.

    With ``n`` and ``m`` given (both or neither), a Linear converts when every group of m
    consecutive weights along ``in`` has at most n non-zeros. Without them each layer's pattern is
    detected: the m in 2, 4, 8, 16 whose largest non-zero count per group n gives the fewest stored
    values (n/m <= 0.75). Layers that stay dense get a reason in the returned report: not a plain
    ``nn.Linear`` (subclasses and the Linear inside ``nn.MultiheadAttention`` keep their forward),
    still parametrized, not N:M, dtype other than float32/bfloat16, not on the CPU. Everything is
    checked before the model is touched. ``crossover`` and ``cache_dense`` go to every NMLinear.

    ``kernel``: which N:M kernel the layers run (:func:`nmsparse.kernels.cpu_select.choose`): ``"auto"``
    (default, or ``$NMSPARSE_NM_KERNEL``) takes the AVX-512 kernel, else the AVX2+FMA one, else none:
    then every layer stays dense with the reason ("no N:M kernel for this CPU (...)"). A forced kernel
    the CPU cannot run natively is a ValueError.

    ``tune`` (default True, or False when ``$NMSPARSE_NM_TUNE=0``): time each distinct layer shape's
    kernel against dense ``F.linear`` at batches 1-32 (:mod:`nmsparse.kernels.tune`, a fraction of a
    second per shape, cached per CPU, shape, dtype and thread count) and use the measured crossover; a
    layer whose kernel loses already at batch 1 stays dense with that reason. ``tune=False`` (reproducible
    runs): the conservative ``NMLinear.default_crossover`` per kernel and dtype. An explicit
    ``crossover`` is used as given (no timing).

    ``min_weights``: a layer with fewer weights (``out * in``) stays dense, with that reason. Default:
    0 when timing (the timing decides), else ``2**22`` (e.g. 2048x2048: smaller weights sit in the CPU
    caches, where dense BLAS is at least as fast as the kernel; ``min_weights=0`` converts them too,
    trading speed for 47% less weight memory).
    """
    if tune is None:
        tune = os.environ.get(TUNE_ENV, "1") != "0"
    tune = bool(tune) and crossover is None
    if min_weights is None:
        min_weights = 0 if tune else DEFAULT_MIN_WEIGHTS
    if isinstance(min_weights, bool) or not isinstance(min_weights, int) or min_weights < 0:
        raise ValueError(f"min_weights must be an integer >= 0 (weights per layer), got {min_weights!r}")
    cpu_select.requested(kernel)
    if (n is None) != (m is None):
        raise ValueError(f"give both n and m (n kept per group of m) or neither, got n={n!r}, m={m!r}")
    if n is not None:
        given = check_nm(n, m)
        n, m = given
        cpu_nm.check_kernel_nm(n, m)
    check_crossover(crossover)  # the same check the layers make
    entries: list[ConvertedLayer] = []
    plan: list[tuple[ConvertedLayer, nn.Module, str, str, int, int]] = []
    mha_children = {id(sub) for mod in model.modules() if isinstance(mod, nn.MultiheadAttention)
                    for sub in mod.children()}
    for name, mod in model.named_modules():
        if isinstance(mod, (parametrize.ParametrizationList, NMLinear)):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(mod, nn.Linear):
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                e = _entry(name, mod)
                e.reason = f"{type(mod).__name__} is not an nn.Linear"
                entries.append(e)
            continue
        e = _entry(name, mod)
        entries.append(e)
        if parametrize.is_parametrized(mod):
            e.reason = "weight is still parametrized (N:M training?); call nmsparse.finalize(model) first"
            continue
        if id(mod) in mha_children:
            e.reason = "inside nn.MultiheadAttention, which reads its .weight directly"
            continue
        if type(mod) is not nn.Linear:
            e.reason = f"{type(mod).__name__} subclasses nn.Linear (its forward may differ)"
            continue
        if n is not None:
            pattern = given
        else:
            if w.dtype not in cpu_nm.KERNEL_DTYPES or w.device.type != "cpu":
                pattern = NMPattern(2, 4)  # only for the dtype/device reason below
            else:
                found = _detect({mm: int(cpu_nm.nonzero_counts(w.detach(), mm).max()) if w.numel() else 0
                                 for mm in cpu_nm.KERNEL_M if w.shape[1] % mm == 0})
                if found is None:
                    e.reason = ("not N:M: no m in (2, 4, 8, 16) dividing in_features has groups with at most "
                                f"{AUTO_MAX_DENSITY:.0%} of m non-zero")
                    continue
                pattern = NMPattern(*found)  # this layer's own, found in its weight
        ln, lm = pattern
        reason = unsupported_reason(mod, pattern)
        if reason is None:
            counts = cpu_nm.nonzero_counts(w.detach(), lm)
            if bool((counts > ln).any()):
                r, g = (int(i) for i in (counts > ln).nonzero()[0])
                reason = f"not {ln}:{lm}: row {r}, group {g} has {int(counts[r, g])} non-zeros"
        if reason is None and w.numel() < min_weights:
            reason = (f"{w.numel()} weights < min_weights={min_weights}: a weight this small sits in the CPU "
                      "caches, where dense BLAS is as fast as the packed kernel (min_weights=0 converts it "
                      "anyway, for the memory)")
        if reason is None:
            choice = cpu_select.choose(lm, w.dtype, kernel)  # a forced kernel the CPU lacks: error, model untouched
            reason = choice.reason if choice.path == "dense" else None
            if reason is None and not tune and crossover is None and not NMLinear.default_crossover[choice.path].get(w.dtype):
                reason = (f"the {choice.path} kernel's default crossover for {w.dtype} is 0 (slower than dense at "
                          "batch 1 where measured); tune=True times it on this CPU, crossover= forces it")
        if reason:
            e.reason = reason
            continue
        parent, _, child = name.rpartition(".")
        plan.append((e, mod, parent, child, pattern))
    if any(not e.name for e, *_ in plan):
        raise ValueError("to_nm_linear cannot replace the model itself (an nn.Linear); wrap it in a container "
                         "(nn.Sequential(linear)) or use NMLinear.from_linear")
    built = []
    for e, mod, parent, child, pattern in plan:
        new = NMLinear.from_linear(mod, pattern, name=e.name, crossover=crossover, cache_dense=cache_dense,
                                   kernel=kernel)
        if tune:
            meas = tuning.measure(mod.weight.detach(), new)
            e.measured = dict(meas.ratios)
            if meas.crossover == 0:
                e.reason = tuning.dense_reason(tuple(mod.weight.shape), mod.weight.dtype, new.path, meas)
                continue
            new.set_measured_crossover(new.path, new.values.dtype, meas.crossover)
        built.append((e, mod, parent, child, pattern, new))
    modules = dict(model.named_modules())
    for e, mod, parent, child, pattern, new in built:
        new.train(mod.training)
        setattr(modules[parent], child, new)
        e.converted, e.nm, e.kernel, e.crossover = True, str(pattern), new.path, new.crossover
        e.packed_bytes = sum(t.numel() * t.element_size() for t in (new.values, new.masks))
    cpu = cpu_select.host_cpu()
    settings = {"n": n, "m": m, "crossover": crossover if crossover is not None else ("measured" if tune else "by kernel and dtype"),
                "cache_dense": cache_dense, "min_weights": min_weights, "kernel": cpu_select.requested(kernel),
                "tune": tune, "cpu": cpu.name, "isa": cpu.isa(), "threads": torch.get_num_threads()}
    return NMLinearReport(entries, settings)

