"""What ``nmsparse inspect`` found: one entry per weight tensor, and a summary."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from nmsparse.export.compress import index_nbytes

_FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


@dataclass
class TensorInfo:
    """One weight: ``axis`` is the reduction axis the pattern is measured along (None: not a matmul
    or conv weight, e.g. an embedding, whose pattern is measured along its last axis)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    axis: int | None
    pattern: str
    n: int | None
    m: int | None
    zeros: float
    transposable: bool | None
    note: str = ""
    two_four: bool = False  # at most 2 non-zeros per 4 along ``axis``: runs on 2:4 kernels

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        if self.dtype in _FP8_NAMES or self.dtype in ("int8", "uint8"):
            return 1
        return 2 if self.dtype in ("float16", "bfloat16") else 8 if self.dtype == "float64" else 4

    def compressed_nbytes(self) -> int:
        """Bytes as kept values plus bit-packed positions (nmsparse's format), or dense bytes."""
        size = self.numel * self.element_size()
        if self.n is None or self.axis is None:
            return size
        return self.numel * self.n // self.m * self.element_size() + index_nbytes(self.numel // self.m, self.n, self.m)


@dataclass
class InspectReport:
    """``path``, ``kind`` (safetensors, hf-folder, compressed-tensors, nmsparse-compressed, checkpoint,
    onnx), ``tensors`` (weights), ``other_params`` (elements of the other tensors: biases, norms,
    scales), ``notes``."""

    path: str
    kind: str
    tensors: list[TensorInfo] = field(default_factory=list)
    other_params: int = 0
    notes: list[str] = field(default_factory=list)

    def weights(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.axis is not None]

    def summary(self) -> str:
        """One line: share of the matmul/conv weight parameters that is N:M, by pattern, and the bytes
        an N:M back end would store them in."""
        w = self.weights()
        total = sum(t.numel for t in w)
        nm = [t for t in w if t.n is not None]
        if not total:
            return f"{self.kind}: no matmul or conv weight found"
        by: dict[str, int] = {}
        for t in nm:
            by[t.pattern] = by.get(t.pattern, 0) + t.numel
        share = sum(by.values()) / total
        parts = ", ".join(f"{k}: {100 * v / total:.1f}%" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
        dense_b = sum(t.numel * t.element_size() for t in w)
        comp_b = sum(t.compressed_nbytes() for t in w)
        line = (f"{len(nm)} of {len(w)} weight tensors N:M, {100 * share:.1f}% of {total:,} weight parameters"
                + (f" ({parts})" if parts else ""))
        if nm:
            line += (f"; stored N:M (kept values + positions) the weights take {_size(comp_b)} instead of "
                     f"{_size(dense_b)} ({100 * comp_b / dense_b:.0f}%)")
            two_four = sum(t.numel for t in nm if t.two_four)
            if two_four:
                line += (f"; {100 * two_four / total:.1f}% can run on 2:4 kernels (sparse tensor cores, "
                         "nmsparse's CPU kernel)")
        return line

    def table(self) -> str:
        head = ("tensor", "shape", "dtype", "axis", "pattern", "zeros", "transposable")
        rows = [head]
        for t in self.tensors:
            trans = "-" if t.transposable is None else ("yes" if t.transposable else "no")
            axis = "-" if t.axis is None else str(t.axis)
            pat = t.pattern + (f" ({t.note})" if t.note else "")
            rows.append((t.name, "x".join(map(str, t.shape)), t.dtype, axis, pat, f"{100 * t.zeros:.1f}%", trans))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([f"{self.path} ({self.kind})", *lines, *self.notes, self.summary()])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["summary"] = self.summary()
        return d
