"""ONNX export of a finalized N:M model, checked the way TensorRT will read it.

TensorRT finds 2:4 sparsity by itself in the *dense* weights of an ONNX file: in every group of 4
consecutive weights along the reduction (input-channel) axis of a convolution or matrix multiply at
most 2 are non-zero; for a convolution, at each kernel position. So the file keeps the zeros in dense
initializers, and what must be checked is the axis of each exported initializer, which depends on the
ONNX node that consumes it:

* ``Conv`` input 1, weight ``(out, in/groups, *kernel)``: axis 1 (the ``"channels"`` layout).
* ``Gemm`` input 1: axis 1 with ``transB=1`` (a Linear weight ``(out, in)``), else axis 0;
  ``Gemm`` input 0: axis 0 with ``transA=1``, else axis 1.
* ``MatMul`` input 1, ``(..., in, out)``: axis -2 (the exporter folds a Linear weight's transpose into a
  new ``(in, out)`` initializer); ``MatMul`` input 0: axis -1.
* An initializer that reaches such a node through ``Transpose`` nodes: the axis mapped back through
  their permutations.

:func:`export_onnx` exports with ``torch.onnx.export(dynamo=True)`` (the torch.export-based exporter,
the default since PyTorch 2.9; the TorchScript one is deprecated), maps every initializer back to the
PyTorch parameter it holds (by name, else by value, transposed or not), checks N:M along the axis above,
runs the file in onnxruntime on the example inputs and compares with PyTorch. A layer that is N:M in
PyTorch but not along the axis TensorRT reads is *broken*: the export fails unless ``allow_broken=True``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nmsparse.layout import SUPPORTED_LAYERS, check_layout, layer_is_nm, reduction_size
from nmsparse.nmmasks import check_nm
from nmsparse.sparsify import sparse_layers

MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and later
_PASS_THROUGH = ("Transpose", "Identity")
_MAX_EXTERNAL = 1 << 30  # above 1 GiB of parameters the weights go to an external ``<file>.data``


@dataclasses.dataclass
class InitializerCheck:
    """One weight in the ONNX file (or a PyTorch N:M weight missing from it).

    ``status``: ``"n:m"`` (N:M along ``axis``, the axis TensorRT reads), ``"dense"`` (not N:M, nor meant
    to be), ``"broken"`` (N:M in PyTorch or along another axis, but not along ``axis``: TensorRT would
    run it dense), or ``"not exported"`` (an N:M PyTorch weight with no initializer in the file).
    ``two_four``: also 2:4 along ``axis``, which TensorRT's sparse kernels need.
    """

    name: str
    param: str | None
    op: str
    shape: tuple[int, ...]
    axis: int | None
    status: str
    two_four: bool = False
    note: str = ""


@dataclasses.dataclass
class OnnxReport:
    """What :func:`export_onnx` wrote and checked."""

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
        rows = [("initializer", "pytorch parameter", "op", "shape", "axis", f"{self.n}:{self.m}", "2:4", "note")]
        for c in self.initializers:
            rows.append((c.name or "-", c.param or "-", c.op or "-", "x".join(map(str, c.shape)),
                         "-" if c.axis is None else str(c.axis), c.status, "yes" if c.two_four else "no", c.note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        nm = self.by_status("n:m")
        lines.append(f"{len(nm)} N:M, {len(self.by_status('dense'))} dense, {len(self.broken)} broken, "
                     f"{len(self.by_status('not exported'))} not exported; opset {self.opset}; {self.path}")
        if nm and not all(c.two_four for c in nm):
            lines.append(f"{self.n}:{self.m} is N:M but not 2:4: TensorRT will run those layers dense")
        elif nm:
            lines.append("every N:M initializer is 2:4: TensorRT can use its sparse kernels (--sparsity=enable)")
        if self.checked:
            lines.append(f"onnxruntime (CPU) vs PyTorch: max |diff| {self.max_abs_diff:.3g} over "
                         f"{len(self.outputs)} outputs (rtol={self.rtol:g}, atol={self.atol:g})")
        else:
            lines.append("onnxruntime comparison not run (check=False)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------------
# Checks on a loaded ONNX model (pure: nothing is written)


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16, no numpy equivalent
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


def _nm_along(t: torch.Tensor, n: int, m: int, axis: int) -> bool:
    if t.dim() == 0 or t.shape[axis] % m:
        return False
    nz = (t != 0).movedim(axis, -1).reshape(-1, m)
    return bool((nz.sum(-1) <= n).all())


def _reduction_uses(graph) -> dict[str, list[tuple[str, int | None]]]:
    """initializer name -> [(consuming op, reduction axis in the initializer or None)]."""
    inits = {i.name: len(i.dims) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    out: dict[str, list] = {}

    def visit(init: str, tensor: str, perm: list[int], depth: int) -> None:
        for node, k in consumers.get(tensor, []):
            attrs = {a.name: a for a in node.attribute}
            rank = len(perm)
            axis = None
            if node.op_type in _PASS_THROUGH and depth < 8:
                p = list(attrs["perm"].ints) if "perm" in attrs else list(range(rank))[::-1]
                if node.op_type == "Identity":
                    p = list(range(rank))
                visit(init, node.output[0], [perm[i] for i in p], depth + 1)
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
            if depth:
                op = f"Transpose->{op}"
            out.setdefault(init, []).append((op, None if axis is None else perm[axis]))

    for name, rank in inits.items():
        visit(name, name, list(range(rank)), 0)
    return out


def _torch_weights(model: nn.Module, n: int, m: int, layout: str) -> tuple[dict, dict, dict]:
    """(name -> parameter, deduplicated), (name -> True for N:M Linear/Conv weights), (id -> name)."""
    params = dict(model.named_parameters())
    canon = {id(p): k for k, p in params.items()}
    expected = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, SUPPORTED_LAYERS) and id(mod.weight) in canon:
            w = mod.weight.detach()
            if reduction_size(w, layout) % m == 0 and layer_is_nm(w, n, m, layout):
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
        if p.shape == arr.shape and torch.equal(p, arr):
            return k, ""
        if p.dim() == 2 and arr.dim() == 2 and p.shape[::-1] == arr.shape and torch.equal(p.t(), arr):
            return k, "transposed"
    return None, ""


def check_initializers(onnx_model, model: nn.Module, n: int, m: int, layout: str = "channels") -> list[InitializerCheck]:
    """Check every weight initializer of a loaded ``onnx.ModelProto`` for N:M (N kept per M) along the
    axis TensorRT reads (see the module doc), mapped back to ``model``'s parameters.

    ``layout`` is the one the model was sparsified or pruned with; it decides which PyTorch Linear/Conv
    weights are N:M and so must stay N:M in the file. Returns one entry per initializer consumed by a
    Conv/Gemm/MatMul or holding an N:M PyTorch weight, then one per N:M PyTorch weight not found.
    """
    from onnx import numpy_helper

    n, m = check_nm(n, m)
    check_layout(layout)
    params, expected, _ = _torch_weights(model, n, m, layout)
    uses = _reduction_uses(onnx_model.graph)
    taken: set[str] = set()
    checks = []
    for init in onnx_model.graph.initializer:
        if not uses.get(init.name) and init.name not in expected:
            continue
        arr = _to_torch(numpy_helper.to_array(init))
        param, how = _match_param(init.name, arr, params, taken)
        reductions = [(op, ax) for op, ax in uses.get(init.name, []) if ax is not None]
        others = sorted({op for op, ax in uses.get(init.name, []) if ax is None})
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
        axes = sorted({ax for _, ax in reductions})
        op = ",".join(sorted({o for o, _ in reductions}))
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
        checks.append(InitializerCheck(init.name, param, op, shape, axes[0], status, two_four, "; ".join(notes)))
    for k in expected:
        if k not in taken:
            checks.append(InitializerCheck("", k, "", tuple(params[k].shape), None, "not exported",
                                           note="N:M in PyTorch; no initializer in the file holds it "
                                           "(unused in forward, or changed by the exporter)"))
    return checks


# ---------------------------------------------------------------------------------------------------
# Export


def _check_number(what: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_inputs(model: nn.Module, example_inputs: object, example_kwargs: object) -> tuple[tuple, dict]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ValueError(f"example_inputs must be a tuple of tensors, e.g. (x,), got {type(example_inputs).__name__}")
    kwargs = {} if example_kwargs is None else example_kwargs
    if not isinstance(kwargs, dict):
        raise ValueError(f"example_kwargs must be a dict of name -> tensor, got {type(kwargs).__name__}")
    for where, v in [(f"example_inputs[{i}]", v) for i, v in enumerate(example_inputs)] + \
                    [(f"example_kwargs[{k!r}]", v) for k, v in kwargs.items()]:
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where} must be a torch.Tensor, got {type(v).__name__}")
    if not example_inputs and not kwargs:
        raise ValueError("example_inputs is empty: pass the inputs of one forward pass, e.g. (x,)")
    left = [name or "<root>" for name, _, _ in sparse_layers(model)]
    if left:
        raise ValueError(f"layer {left[0]} still has its N:M parametrization ({len(left)} such layers): "
                         "call nmsparse.finalize(model) before exporting")
    return tuple(example_inputs), dict(kwargs)


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"path {str(p)!r} is a directory; give the .onnx file to write, e.g. {str(p / 'model.onnx')!r}")
    if not p.parent.is_dir():
        raise ValueError(f"directory {str(p.parent)!r} does not exist; create it first")
    return p


def _check_opset(opset: object) -> int | None:
    if opset is None:
        return None
    import onnx

    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset must be None or an integer from {MIN_OPSET} (the torch.export-based exporter) "
                         f"to {top} (this onnx package), got {opset!r}")
    return opset


def _feeds(model: nn.Module, session, args: tuple, kwargs: dict) -> dict:
    names = [i.name for i in session.get_inputs()]
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {}
    if all(k in bound and isinstance(bound[k], torch.Tensor) for k in names):
        return {k: bound[k].detach().cpu().numpy() for k in names}
    leaves = list(args) + list(kwargs.values())
    if len(leaves) != len(names):
        raise RuntimeError(f"the ONNX file takes inputs {names} but {len(leaves)} example tensors were given")
    return {k: v.detach().cpu().numpy() for k, v in zip(names, leaves)}


def _compare(model: nn.Module, file: Path, args: tuple, kwargs: dict, rtol: float, atol: float) -> list[dict]:
    import onnxruntime as ort
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        ref = [t for t in tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    got = session.run(None, _feeds(model, session, args, kwargs))
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(ref):
        raise RuntimeError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(ref)}; cannot compare them")
    outputs = []
    for name, a, b in zip(names, got, ref):
        a64 = torch.from_numpy(np.asarray(a, dtype=np.float64))
        b64 = b.detach().cpu().to(torch.float64)
        if tuple(a64.shape) != tuple(b64.shape):
            raise RuntimeError(f"output {name!r}: onnxruntime shape {tuple(a64.shape)} != PyTorch {tuple(b64.shape)}")
        diff = (a64 - b64).abs()
        bad = ~(diff <= atol + rtol * b64.abs())
        bad &= ~(torch.isnan(a64) & torch.isnan(b64))
        if bad.any():
            raise RuntimeError(
                f"output {name!r}: onnxruntime differs from PyTorch by up to {float(diff[bad].max()):.3g} "
                f"(rtol={rtol:g}, atol={atol:g}); nothing was written"
            )
        outputs.append({"name": name, "shape": list(a64.shape),
                        "max_abs_diff": float(diff.nan_to_num(0.0).max()) if diff.numel() else 0.0})
    return outputs


def _require(check: bool) -> None:
    import importlib.util

    need = ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])
    missing = [k for k in need if importlib.util.find_spec(k) is None]
    if missing:
        raise ImportError(f"export_onnx needs {', '.join(missing)}: pip install 'nmsparse[onnx]'")


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    n: int,
    m: int,
    layout: str = "channels",
    opset: int | None = None,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    example_kwargs: dict | None = None,
    allow_broken: bool = False,
) -> OnnxReport:
    """Export a finalized N:M model (N weights kept in every group of M) to ONNX at ``path`` and check it.

    ``example_inputs``: the positional tensors of one forward pass (``example_kwargs``: keyword tensors,
    e.g. a tokenizer's ``attention_mask``); the file's shapes are those of these inputs. ``layout``: the
    layout the model was sparsified or pruned with. ``opset``: None for the exporter's default (>= 18).
    The model is exported in eval mode (its mode is restored) with ``torch.onnx.export(dynamo=True)``;
    weights stay dense initializers holding the zeros. Every weight initializer is checked for N:M along
    the axis TensorRT reads (:func:`check_initializers`); a PyTorch N:M layer that is not N:M there is
    *broken* and fails the export with a ``ValueError`` unless ``allow_broken=True``. With ``check=True``
    the file also passes ``onnx.checker`` and onnxruntime (CPU) must reproduce PyTorch's outputs within
    ``|ort - torch| <= atol + rtol * |torch|`` (else ``RuntimeError``). The file is written to a
    temporary name and renamed: on any error nothing is written. Above 1 GiB of parameters the weights
    go to ``<path>.data`` next to it (ONNX's 2 GiB protobuf limit).
    """
    n, m = check_nm(n, m)
    check_layout(layout)
    args, kwargs = _check_inputs(model, example_inputs, example_kwargs)
    dest = _check_path(path)
    rtol, atol = _check_number("rtol", rtol), _check_number("atol", atol)
    for what, flag in (("check", check), ("allow_broken", allow_broken)):
        if not isinstance(flag, bool):
            raise ValueError(f"{what} must be True or False, got {flag!r}")
    _require(check)
    opset = _check_opset(opset)
    import onnx

    was_training = model.training
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmpdir / dest.name
    try:
        model.eval()
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > _MAX_EXTERNAL
        try:
            torch.onnx.export(model, args, str(tmp), kwargs=kwargs or None, dynamo=True, optimize=True,
                              external_data=big, opset_version=opset, verbose=False)
        except Exception as e:  # the exporter's own errors are long; keep the cause attached
            raise RuntimeError(f"torch.onnx.export failed for {type(model).__name__}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        proto = onnx.load(str(tmp))
        if check:
            onnx.checker.check_model(str(tmp))
        checks = check_initializers(proto, model, n, m, layout)
        broken = [c for c in checks if c.status == "broken"]
        if broken and not allow_broken:
            first = broken[0]
            raise ValueError(
                f"{len(broken)} exported weight(s) break the {n}:{m} pattern TensorRT reads, first "
                f"{first.name or first.param} ({first.param or 'no PyTorch parameter'}): {first.note}; "
                "nothing was written (pass allow_broken=True to write the file anyway)"
            )
        outputs = _compare(model, tmp, args, kwargs, rtol, atol) if check else []
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, dest.parent / f.name)
    finally:
        model.train(was_training)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return OnnxReport(str(dest), n, m, layout, opset_used, checks, outputs, check, rtol, atol)
