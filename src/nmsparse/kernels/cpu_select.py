"""Which N:M kernel runs on this CPU: the AVX-512 kernel, the AVX2+FMA kernel, or dense (never a scalar lowering).

N is the number of weights **kept** in every group of M consecutive weights along ``in``.

The CPU is the one numba compiles for: ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when set (that is
how the AVX2 kernel is built and tested for ``haswell`` on an AVX-512 machine), else the host as
llvmlite reports it. A kernel is chosen only when the CPU has every feature its instructions need,
because LLVM lowers a missing one (``vexpandps`` without AVX-512) to scalar code that runs 3-20x
slower than dense:

* ``"avx512"``: ``llvm.masked.expandload`` (``vexpandps`` needs ``avx512f``; the bf16 kernel's
  ``vpexpandw`` also ``avx512vbmi2`` and ``avx512bw``), m in 2, 4, 8, 16.
* ``"avx2"``: a lookup table from each 8-column mask byte to a ``vpermps`` index vector (``avx2``,
  ``fma``), m in 2, 4, 8.
* ``"dense"``: the layer decompresses its weight once and calls ``F.linear`` (any CPU).

Override with ``kernel=`` (``NMLinear``, ``to_nm_linear``) or the environment variable
``NMSPARSE_NM_KERNEL`` (``auto``, ``avx512``, ``avx2``, ``dense``); a forced kernel the CPU cannot run
natively is an error, not a silent scalar fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

PATHS = ("avx512", "avx2", "dense")
ENV_VAR = "NMSPARSE_NM_KERNEL"
# The kernels' instruction needs, per values dtype, and the m each kernel takes.
NEEDS = {
    "avx512": {torch.float32: ("avx512f",), torch.bfloat16: ("avx512f", "avx512bw", "avx512vbmi2")},
    "avx2": {torch.float32: ("avx2", "fma"), torch.bfloat16: ("avx2", "fma")},
}
PATH_M = {"avx512": (2, 4, 8, 16), "avx2": (2, 4, 8)}
# An LLVM feature string for an AVX2 + FMA CPU without AVX-512 (Intel Haswell): with
# NUMBA_CPU_NAME=haswell, numba would otherwise take the host's features (AVX-512 included).
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,+fxsr,+invpcid,+lzcnt,"
                    "+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,"
                    "+xsaveopt,-avx512f,-avx512bw,-avx512vl,-avx512dq,-avx512cd,-avx512vbmi2,-avx512bf16")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """A CPU as LLVM names it (``znver5``, ``haswell``) and its enabled features."""

    name: str
    features: frozenset

    def has(self, *feats: str) -> bool:
        return all(f in self.features for f in feats)

    def isa(self) -> str:
        """A short ISA label for reports: the widest vector extension the CPU has."""
        if self.has("avx512f"):
            return "AVX-512" + (" BF16" if self.has("avx512bf16") else "")
        if self.has("avx2", "fma"):
            return "AVX2+FMA"
        return "no AVX2+FMA"


def parse_features(spec: str) -> frozenset:
    """The enabled features of an LLVM feature string (``"+avx2,+fma,-avx512f"``)."""
    return frozenset(f[1:] for f in spec.split(",") if f.startswith("+"))


@functools.lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    """The CPU numba compiles for (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` when set, else the host)."""
    import llvmlite.binding as ll
    from numba.core import config

    name = config.CPU_NAME or ll.get_host_cpu_name()
    if config.CPU_FEATURES is not None:
        feats = parse_features(config.CPU_FEATURES)
    else:
        feats = frozenset(k for k, v in ll.get_host_cpu_features().items() if v)
    return CpuInfo(str(name), feats)


def missing(path: str, dtype: torch.dtype, cpu: CpuInfo) -> tuple[str, ...]:
    """The features ``path``'s ``dtype`` kernel needs that ``cpu`` lacks (empty: it runs natively)."""
    return tuple(f for f in NEEDS[path].get(dtype, ("?",)) if f not in cpu.features)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The kernel a layer runs (``path``), and, for ``"dense"``, why no N:M kernel does."""

    path: str
    reason: str = ""


def requested(kernel: str | None = None) -> str:
    """The kernel asked for: ``kernel`` if given, else ``$NMSPARSE_NM_KERNEL``, else ``"auto"``."""
    value = kernel if kernel is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if value not in ("auto",) + PATHS:
        src = "kernel" if kernel is not None else ENV_VAR
        raise ValueError(f"{src} must be one of auto, {', '.join(PATHS)}; got {value!r}")
    return value


def choose(m: int, dtype: torch.dtype, kernel: str | None = None, cpu: CpuInfo | None = None) -> Choice:
    """The kernel for an n:m layer of ``dtype`` on ``cpu`` (default: :func:`host_cpu`).

    ``kernel`` (else ``$NMSPARSE_NM_KERNEL``): ``"auto"`` takes the first of AVX-512, AVX2 that the
    CPU runs natively and that takes this m, else ``"dense"`` with the reason. A named kernel is used
    as asked; ValueError when the CPU lacks its features or it does not take m (it would be a scalar
    lowering, or not run at all)."""
    want = requested(kernel)
    cpu = cpu or host_cpu()
    if want == "dense":
        return Choice("dense", f"dense forced ({'kernel' if kernel is not None else ENV_VAR}='dense')")
    if want != "auto":
        lack = missing(want, dtype, cpu)
        if lack:
            raise ValueError(f"the {want} N:M kernel needs {', '.join(lack)}, which this CPU ({cpu.name}) lacks; "
                             "use kernel='auto' (picks what the CPU runs, else dense)")
        if m not in PATH_M[want]:
            raise ValueError(f"the {want} N:M kernel takes m in {PATH_M[want]}, got m={m}; use kernel='auto'")
        return Choice(want)
    why = []
    for path in ("avx512", "avx2"):
        lack = missing(path, dtype, cpu)
        if lack:
            why.append(f"{path}: no {'/'.join(lack)}")
        elif m not in PATH_M[path]:
            why.append(f"{path}: m={m} not in {PATH_M[path]}")
        else:
            return Choice(path)
    return Choice("dense", f"no N:M kernel for this CPU ({cpu.name}, {cpu.isa()}; {'; '.join(why)})")


def haswell_env(dense_too: bool = True) -> dict[str, str]:
    """Environment variables that make a fresh process compile nmsparse's kernels for an AVX2+FMA CPU
    without AVX-512 (``haswell``); with ``dense_too`` also torch's own CPU code (ATen's vectorized
    kernels, MKL, oneDNN) stops at AVX2, so that dense baselines are an AVX2 machine's too. For
    testing and benchmarking the AVX2 path on an AVX-512 machine (the memory system stays this one's)."""
    env = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL_FEATURES}
    if dense_too:
        env.update({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    return env

