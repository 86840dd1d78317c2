"""Run an exported ONNX file in onnxruntime (CPU) and compare it with PyTorch, at several input shapes.

onnxruntime's CPU provider runs float32 and float16 graphs but has no bfloat16 kernels (``Add``,
``Gemm``, ``MatMul``... fail with NOT_IMPLEMENTED). A bfloat16 file is therefore checked through
:func:`upcast_bf16`: the same graph with every bfloat16 initializer, constant, cast and declared type
turned into float32 (each bfloat16 value is exact in float32), compared with the PyTorch model cast
to float32. That checks the graph and its weights; it does not check bfloat16 rounding, and constants
the exporter folded in bfloat16 stay rounded (hence the looser default tolerance, :data:`TOLERANCES`).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

# default (rtol, atol) of |ort - torch| <= atol + rtol * |torch|, by the model's dtype. bfloat16: the file
# upcast to float32 against the model in float32; looser because the exporter folds some constants in
# bfloat16 (all-MiniLM-L6-v2: the attention scale sqrt(1/sqrt(32)) becomes 0.41992 instead of 0.42045,
# which moves last_hidden_state by up to 8e-3 at batch 16, 128 tokens)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 5e-3), torch.bfloat16: (2e-2, 2e-2)}


def upcast_bf16(proto):
    """A copy of ``proto`` (an ``onnx.ModelProto``) with every bfloat16 tensor, type and cast made float32."""
    import onnx
    from onnx import numpy_helper

    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    proto = copy.deepcopy(proto)

    def tensor(t) -> None:
        if t.data_type == bf16:
            arr = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def vtype(v) -> None:
        tt = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type == bf16:
            tt.elem_type = f32

    def nodes(ns) -> None:
        for node in ns:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == bf16:
                    a.i = f32
                elif a.type == onnx.AttributeProto.TENSOR:
                    tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        graph(g)

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for v in list(g.input) + list(g.output) + list(g.value_info):
            vtype(v)
        nodes(g.node)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
    return proto


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    kinds = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def _fail(e: Exception) -> RuntimeError:  # onnxruntime's own errors, e.g. an op its CPU provider lacks
    first = str(e).splitlines()[0] if str(e) else ""
    return RuntimeError(f"onnxruntime could not run the file: {type(e).__name__}: {first}; "
                        "pass check=False to skip the comparison; nothing was written")


def _session(file: Path, upcast: bool, workdir: Path):
    import onnx
    import onnxruntime as ort

    if upcast:
        proto = upcast_bf16(onnx.load(str(file)))
        file = workdir / "float32.onnx"
        big = sum(len(t.raw_data) for t in proto.graph.initializer) > (1 << 30)  # protobuf's 2 GiB limit
        onnx.save(proto, str(file), save_as_external_data=big, location="float32.onnx.data")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about the graph are not the user's business
    try:
        return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _fail(e) from e


def compare(model: nn.Module, file: Path, io, shapes: list[dict[str, int]], rtol: float | None,
            atol: float | None, output_names: list[str]) -> dict:
    """Run ``file`` in onnxruntime on the example inputs of ``io`` (a :class:`~nmsparse.export.onnx_io.GraphInputs`)
    resized to each of ``shapes`` (``{}``: the example as it is) and compare every output with PyTorch's:
    ``|ort - torch| <= atol + rtol * |torch|`` (None: the default for the model's dtype, :data:`TOLERANCES`).
    Returns ``{"outputs": [{name, shape, max_abs_diff}], "runs": [{sizes, inputs, max_abs_diff}], "rtol",
    "atol", "precision"}`` (``sizes``: each dynamic axis's size in that run); raises ``RuntimeError`` saying what differs."""
    from torch.utils._pytree import tree_leaves

    dtype = _float_dtype(model)
    upcast = dtype == torch.bfloat16
    reference = copy.deepcopy(model).float() if upcast else model
    lo, la = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    rtol, atol = lo if rtol is None else rtol, la if atol is None else atol
    outputs: dict[str, dict] = {}
    runs = []
    with tempfile.TemporaryDirectory(prefix=".nmsparse-ort.", dir=file.parent) as work:
        session = _session(file, upcast, Path(work))
        names = [i.name for i in session.get_inputs()]
        if names != io.names:
            raise RuntimeError(f"the ONNX file takes inputs {names} but the example gives {io.names}; "
                               "nothing was written")
        for sizes in shapes:
            tensors = io.resized(sizes)
            if upcast:
                tensors = [t.float() if t.dtype == torch.bfloat16 else t for t in tensors]
            args, kwargs = io.call(tensors)
            with torch.no_grad():
                ref = [t for t in tree_leaves(reference(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            try:
                got = session.run(None, {k: t.detach().cpu().numpy() for k, t in zip(names, tensors)})
            except Exception as e:
                raise _fail(e) from e
            if len(got) != len(ref):
                raise RuntimeError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(ref)}; cannot compare "
                                   "them; nothing was written")
            shape_text = ", ".join(f"{k} {tuple(t.shape)}" for k, t in zip(names, tensors))
            worst = 0.0
            for name, a, b in zip(output_names, got, ref):
                diff = _diff(name, a, b, rtol, atol, shape_text)
                worst = max(worst, diff)
                o = outputs.setdefault(name, {"name": name, "shape": list(np.shape(a)), "max_abs_diff": 0.0})
                o["max_abs_diff"] = max(o["max_abs_diff"], diff)
            runs.append({"sizes": {**io.sizes(), **sizes}, "inputs": {k: list(t.shape) for k, t in zip(names, tensors)},
                         "max_abs_diff": worst})
    precision = "bfloat16 upcast to float32" if upcast else str(dtype).replace("torch.", "") if dtype else "mixed"
    return {"outputs": list(outputs.values()), "runs": runs, "rtol": rtol, "atol": atol, "precision": precision}


def _diff(name: str, a, b: torch.Tensor, rtol: float, atol: float, shapes: str) -> float:
    a64 = torch.from_numpy(np.asarray(a, dtype=np.float64))
    b64 = b.detach().cpu().to(torch.float64)
    if tuple(a64.shape) != tuple(b64.shape):
        raise RuntimeError(f"output {name!r}: onnxruntime shape {tuple(a64.shape)} != PyTorch {tuple(b64.shape)} "
                           f"(inputs {shapes}); nothing was written")
    diff = (a64 - b64).abs()
    bad = ~(diff <= atol + rtol * b64.abs())
    bad &= ~(torch.isnan(a64) & torch.isnan(b64))
    if bad.any():
        raise RuntimeError(f"output {name!r}: onnxruntime differs from PyTorch by up to {float(diff[bad].max()):.3g} "
                           f"(rtol={rtol:g}, atol={atol:g}; inputs {shapes}); nothing was written")
    return float(diff.nan_to_num(0.0).max()) if diff.numel() else 0.0
