"""What :func:`nmsparse.export.export_onnx` wrote and checked: :class:`OnnxReport`."""

from __future__ import annotations

import dataclasses

from nmsparse.export.onnx_check import InitializerCheck


def graph_signature(proto) -> dict[str, list[dict]]:
    """The graph's inputs and outputs as written: ``{"inputs"|"outputs": [{name, shape, dtype}]}``, a dynamic
    axis given by its name (``"batch"``), a fixed one by its size."""
    import onnx

    def one(v) -> dict:
        tt = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?"
                for d in tt.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}

    inits = {i.name for i in proto.graph.initializer}
    return {"inputs": [one(v) for v in proto.graph.input if v.name not in inits],
            "outputs": [one(v) for v in proto.graph.output]}


def _shape(dims: list) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


@dataclasses.dataclass
class OnnxReport:
    """What :func:`export_onnx` wrote and checked.

    ``signature``: the file's inputs and outputs (name, shape with dynamic axes named, dtype).
    ``outputs``: per output, the largest ``|onnxruntime - PyTorch|`` over ``runs`` (one per input shape
    checked). ``precision``: the dtype onnxruntime computed in (a bfloat16 file runs upcast to float32).
    """

    path: str
    n: int
    m: int
    layout: str
    opset: int
    initializers: list[InitializerCheck]
    outputs: list[dict] = dataclasses.field(default_factory=list)
    checked: bool = False
    rtol: float = 0.0
    atol: float = 0.0
    signature: dict = dataclasses.field(default_factory=dict)
    runs: list[dict] = dataclasses.field(default_factory=list)
    precision: str = ""

    def by_status(self, status: str) -> list[InitializerCheck]:
        return [c for c in self.initializers if c.status == status]

    @property
    def broken(self) -> list[InitializerCheck]:
        return self.by_status("broken")

    @property
    def max_abs_diff(self) -> float | None:
        return max((o["max_abs_diff"] for o in self.outputs), default=None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["max_abs_diff"] = self.max_abs_diff
        return d

    def table(self) -> str:
        rows = [("initializer", "pytorch parameter", "op", "shape", "axis", "status", "TensorRT 2:4", "note")]
        for c in self.initializers:
            rows.append((c.name or "-", c.param or "-", c.op or "-", "x".join(map(str, c.shape)),
                         "-" if c.axis is None else str(c.axis), c.status, "yes" if c.two_four else "no", c.note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        nm = self.by_status("n:m")
        lines.append(f"{len(nm)} N:M ({self.n}:{self.m}), {len(self.by_status('dense'))} dense, {len(self.broken)} "
                     f"broken, {len(self.by_status('not exported'))} not exported; opset {self.opset}; {self.path}")
        if nm and not all(c.two_four for c in nm):
            lines.append(f"{self.n}:{self.m} is N:M but not 2:4: TensorRT will run those layers dense")
        elif nm:
            lines.append("every N:M initializer is 2:4: TensorRT can use its sparse kernels (--sparsity=enable)")
        for what in ("inputs", "outputs"):
            if self.signature.get(what):
                lines.append(f"{what}: " + ", ".join(f"{v['name']} {_shape(v['shape'])} {v['dtype']}"
                                                    for v in self.signature[what]))
        if self.checked:
            at = "; ".join(" ".join(f"{k}={v}" for k, v in r["sizes"].items()) for r in self.runs if r["sizes"])
            lines.append(f"onnxruntime (CPU, {self.precision}) vs PyTorch: max |diff| {self.max_abs_diff:.3g} over "
                         f"{len(self.outputs)} outputs at {at or 'the example shapes (no dynamic axis)'} "
                         f"(rtol={self.rtol:g}, atol={self.atol:g})")
        else:
            lines.append("onnxruntime comparison not run (check=False)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
