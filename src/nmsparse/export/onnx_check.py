"""Which weights of an ONNX file are N:M along the axis TensorRT reads (pure: nothing is written).

The axis depends on the node consuming each initializer; see :mod:`nmsparse.export.onnx` for the table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from nmsparse.masking.layout import SUPPORTED_LAYERS, check_layout, layer_is_nm, reduction_size
from nmsparse.masking.pattern import NMPattern, check_nm

_PASS_THROUGH = ("Transpose", "Identity", "Cast")  # shape-preserving (Transpose: permuting) on the way to a matmul


@dataclasses.dataclass
class InitializerCheck:
    """One weight in the ONNX file (or a PyTorch N:M weight missing from it).

    ``status``: ``"n:m"`` (N:M along ``axis``, the axis TensorRT reads), ``"dense"`` (not N:M, nor meant
    to be), ``"broken"`` (N:M in PyTorch or along another axis, but not along ``axis``: TensorRT would
    run it dense), or ``"not exported"`` (an N:M PyTorch weight with no initializer in the file).
    ``two_four``: also 2:4 along ``axis``, which TensorRT's sparse kernels need. ``op``: the consuming
    node type(s), e.g. ``"Conv"``, ``"Gemm(transB=1)"``, ``"MatMul"``, ``"Transpose->MatMul"``.
    """

    name: str
    param: str | None
    op: str
    shape: tuple[int, ...]
    axis: int | None
    status: str
    two_four: bool = False
    note: str = ""
    nodes: tuple[str, ...] = ()  # the ONNX nodes that reduce over it (Conv/Gemm/MatMul), by name


# ml_dtypes types (no numpy equivalent) that onnx's numpy_helper returns -> (numpy view, torch dtype)
_ML_DTYPES = {"bfloat16": (np.uint16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
              "float8_e5m2": (np.uint8, torch.float8_e5m2)}


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    """A copy of an initializer's array as a torch tensor (bfloat16 and float8 included)."""
    special = _ML_DTYPES.get(arr.dtype.name)
    if special is not None:
        return torch.from_numpy(np.array(arr, copy=True).view(special[0])).view(special[1])
    return torch.from_numpy(np.array(arr, copy=True))


def _nm_along(t: torch.Tensor, n: int, m: int, axis: int) -> bool:
    if t.dim() == 0 or t.shape[axis] % m:
        return False
    nz = (t != 0).movedim(axis, -1).reshape(-1, m)
    return bool((nz.sum(-1) <= n).all())


def _reduction_uses(graph) -> dict[str, list[tuple[str, int | None, str]]]:
    """initializer name -> [(consuming op, reduction axis in the initializer or None, node name)]."""
    inits = {i.name: len(i.dims) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    out: dict[str, list] = {}

    def visit(init: str, tensor: str, perm: list[int], via: tuple[str, ...]) -> None:
        for node, k in consumers.get(tensor, []):
            attrs = {a.name: a for a in node.attribute}
            rank = len(perm)
            axis = None
            if node.op_type in _PASS_THROUGH and len(via) < 8:
                p = list(attrs["perm"].ints) if "perm" in attrs else list(range(rank))[::-1]
                if node.op_type != "Transpose":  # Identity, Cast (e.g. fp16 weights cast to float32)
                    p = list(range(rank))
                visit(init, node.output[0], [perm[i] for i in p], via + (node.op_type,))
                continue
            if node.op_type in ("Conv", "ConvInteger") and k == 1 and rank >= 3:
                axis = 1
            elif node.op_type == "Gemm" and k in (0, 1) and rank == 2:
                key = "transB" if k == 1 else "transA"
                trans = attrs[key].i if key in attrs else 0
                axis = (1 if trans else 0) if k == 1 else (0 if trans else 1)
            elif node.op_type in ("MatMul", "MatMulInteger") and k in (0, 1):
                axis = rank - 1 if k == 0 or rank == 1 else rank - 2
            op = node.op_type
            if node.op_type == "Gemm":
                op = f"Gemm(transB={attrs['transB'].i if 'transB' in attrs else 0})" if k == 1 else "Gemm(A)"
            if via:
                op = "->".join(via + (op,))
            out.setdefault(init, []).append((op, None if axis is None else perm[axis], node.name))

    for name, rank in inits.items():
        visit(name, name, list(range(rank)), ())
    return out


def _torch_weights(model: nn.Module, pattern: NMPattern, layout: str) -> tuple[dict, dict, dict]:
    """(name -> parameter, deduplicated), (name -> True for N:M Linear/Conv weights), (id -> name)."""
    params = dict(model.named_parameters())
    canon = {id(p): k for k, p in params.items()}
    expected = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, SUPPORTED_LAYERS) and id(mod.weight) in canon:
            w = mod.weight.detach()
            if reduction_size(w, layout) % pattern.m == 0 and layer_is_nm(w, pattern, layout=layout):
                expected[canon[id(mod.weight)]] = True
    return params, expected, canon


def _rows_rescaled(p: torch.Tensor, a: torch.Tensor) -> bool:
    """Same zeros and each output row (dim 0) a constant multiple of PyTorch's: a folded BatchNorm."""
    p, a = p.double().reshape(p.shape[0], -1), a.double().reshape(a.shape[0], -1)
    if not torch.equal(p != 0, a != 0):
        return False
    ratio = torch.where(p != 0, a / p.where(p != 0, 1.0), float("nan"))
    lo = ratio.nan_to_num(float("inf")).amin(1)
    hi = ratio.nan_to_num(float("-inf")).amax(1)
    ok = (hi - lo).abs() <= 1e-5 * hi.abs().clamp_min(1e-30)
    return bool(ok[torch.isfinite(lo)].all())


def _match_param(name: str, arr: torch.Tensor, params: dict, taken: set) -> tuple[str | None, str]:
    """The PyTorch parameter an initializer holds: by name (values may differ by a folded BatchNorm),
    else by equal value, as it is or transposed."""
    if name in params and tuple(params[name].shape) in (tuple(arr.shape), tuple(arr.shape)[::-1]):
        p = params[name].detach().cpu()
        if p.shape != arr.shape:
            return name, "same name, transposed shape"
        if torch.equal(p.to(arr.dtype), arr):
            return name, ""
        return name, "rows rescaled (a BatchNorm folded in)" if _rows_rescaled(p, arr) else "values differ"
    for k, p in params.items():
        if k in taken or p.numel() != arr.numel() or p.dtype != arr.dtype:
            continue
        p = p.detach().cpu()
        if p.shape == arr.shape and torch.equal(p[0], arr[0]) and torch.equal(p, arr):
            return k, ""
        if (p.dim() == 2 and arr.dim() == 2 and p.shape[::-1] == arr.shape
                and torch.equal(p[0], arr[:, 0]) and torch.equal(p.t(), arr)):
            return k, "transposed"
    return None, ""


def check_initializers(onnx_model, model: nn.Module, n: int | NMPattern, m: int | None = None,
                       layout: str = "channels") -> list[InitializerCheck]:
    """Check every weight initializer of a loaded ``onnx.ModelProto`` for N:M (N kept per M) along the
    axis TensorRT reads (see the module doc), mapped back to ``model``'s parameters.

    ``layout`` is the one the model was sparsified or pruned with; it decides which PyTorch Linear/Conv
    weights are N:M and so must stay N:M in the file. Returns one entry per initializer consumed by a
    Conv/Gemm/MatMul or holding an N:M PyTorch weight, then one per N:M PyTorch weight not found.
    """
    from onnx import numpy_helper

    pattern = check_nm(n, m)
    n, m = pattern
    check_layout(layout)
    params, expected, _ = _torch_weights(model, pattern, layout)
    uses = _reduction_uses(onnx_model.graph)
    taken: set[str] = set()
    checks = []
    for init in onnx_model.graph.initializer:
        if not uses.get(init.name) and init.name not in expected:
            continue
        arr = _to_torch(numpy_helper.to_array(init))
        param, how = _match_param(init.name, arr, params, taken)
        reductions = [(op, ax, node) for op, ax, node in uses.get(init.name, []) if ax is not None]
        others = sorted({op for op, ax, _ in uses.get(init.name, []) if ax is None})
        if not reductions and param not in expected:
            continue  # an embedding table, a bias...: not a weight TensorRT could run sparse
        if param is not None:
            taken.add(param)
        want = param in expected
        shape = tuple(arr.shape)
        if not reductions:
            checks.append(InitializerCheck(init.name, param, ",".join(others) or "-", shape, None, "broken",
                                           note=f"N:M in PyTorch but consumed by {others or 'nothing'}, not a "
                                           "Conv/Gemm/MatMul weight TensorRT can run sparse"))
            continue
        axes = sorted({ax for _, ax, _ in reductions})
        op = ",".join(sorted({o for o, _, _ in reductions}))
        nodes = tuple(node for _, _, node in reductions)
        ok = all(_nm_along(arr, n, m, ax) for ax in axes)
        two_four = all(_nm_along(arr, 2, 4, ax) for ax in axes)
        notes = [how] if how else []
        if ok:
            status = "n:m"
            if not two_four:
                notes.append("not 2:4: TensorRT runs it dense")
        else:
            other = [ax for ax in range(arr.dim()) if ax not in axes and _nm_along(arr, n, m, ax)]
            flat = arr.dim() > 2 and _nm_along(arr.reshape(arr.shape[0], -1), n, m, 1)
            if want or other or flat:
                status = "broken"
                where = (f"along axis {other[0]}" if other else "in the flat layout" if flat else "in PyTorch")
                notes.append(f"{n}:{m} {where} but not along axis {axes[0]}, the reduction axis TensorRT reads"
                             + (" (prune or sparsify with layout='channels')" if flat and not other else ""))
            else:
                status = "dense"
        checks.append(InitializerCheck(init.name, param, op, shape, axes[0], status, two_four, "; ".join(notes),
                                       nodes))
    for k in expected:
        if k not in taken:
            checks.append(InitializerCheck("", k, "", tuple(params[k].shape), None, "not exported",
                                           note="N:M in PyTorch; no initializer in the file holds it "
                                           "(unused in forward, or changed by the exporter)"))
    return checks
