"""``nmsparse.inspect(path)``: per weight tensor of any checkpoint, its finest N:M pattern."""

from __future__ import annotations

import os
from pathlib import Path

from nmsparse.inspection.patterns import Pattern, finest_pattern
from nmsparse.inspection.report import InspectReport, TensorInfo
from nmsparse.inspection.sources import READERS, detect


def inspect(path: str | os.PathLike) -> InspectReport:
    """Read ``path`` (a safetensors file, a Hugging Face folder, sharded or not, an nmsparse compressed
    file, a torch.save training checkpoint, a compressed-tensors folder or an ONNX file) one tensor at
    a time, without running code from it, and report for each weight its shape, dtype, the finest N:M
    pattern along its reduction axis (N kept per M: "2:4", "1:4", ..., "dense" or "unstructured x%
    zeros") and whether it is transposable. Raises :class:`~nmsparse.plumbing.errors.LoadError` (one line) for
    a damaged or unknown file."""
    p = Path(path)
    kind = detect(p)
    report = InspectReport(str(p), kind)
    for name, t, axis, note in READERS[kind](p):
        floating = t.dtype.is_floating_point or "float8" in str(t.dtype)
        if t.dim() < 2 or not floating or (axis is None and not name.endswith("weight")):  # scales, constants
            report.other_params += t.numel()
            continue
        pat = finest_pattern(t, axis if axis is not None else t.dim() - 1)
        other = None
        if axis == 1 and t.dim() > 2:  # a conv weight: also nmsparse's flat layout (in/groups x kernel)
            other = (finest_pattern(t.reshape(t.shape[0], -1), 1), "in the flat layout (in x kernel)")
        elif axis in (0, 1) and t.dim() == 2 and not pat.two_four:  # an (in, out) weight read as (out, in)?
            other = (finest_pattern(t, 1 - axis), f"along axis {1 - axis} (a transposed layout, e.g. GPT-2's Conv1D?)")
        if other is not None and _finer(other[0], pat):
            note = "; ".join(v for v in (note, f"{other[0].label} {other[1]}") if v)
        report.tensors.append(TensorInfo(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), axis,
                                         pat.label, pat.n, pat.m, pat.zeros, pat.transposable, note, pat.two_four))
    if kind == "compressed-tensors" and any(t.dtype.startswith("float8") for t in report.tensors):
        report.notes.append("FP8 weights are measured as stored (float8); their scales count as other parameters")
    return report


def _finer(a: Pattern, b: Pattern) -> bool:
    """``a`` is N:M and of lower density than ``b`` (or ``b`` is not N:M)."""
    return a.n is not None and (b.n is None or a.n * b.m < b.n * a.m)
