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

from nmsparse.export.onnx_check import InitializerCheck, check_initializers
from nmsparse.layout import check_layout
from nmsparse.nmmasks import check_nm
from nmsparse.sparsify import sparse_layers

__all__ = ["InitializerCheck", "OnnxReport", "check_initializers", "export_onnx"]

MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and later
_MAX_EXTERNAL = 1 << 30  # above 1 GiB of parameters the weights go to an external ``<file>.data``


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
        raise RuntimeError(f"the ONNX file takes inputs {names} but {len(leaves)} example tensors were given; "
                           "nothing was written")
    return {k: v.detach().cpu().numpy() for k, v in zip(names, leaves)}


def _compare(model: nn.Module, file: Path, args: tuple, kwargs: dict, rtol: float, atol: float) -> list[dict]:
    import onnxruntime as ort
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        ref = [t for t in tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    def fail(e: Exception) -> RuntimeError:  # onnxruntime's own errors, e.g. an op its CPU provider lacks
        first = str(e).splitlines()[0] if str(e) else ""
        return RuntimeError(f"onnxruntime could not run the file: {type(e).__name__}: {first}; "
                            "pass check=False to skip the comparison; nothing was written")

    try:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise fail(e) from e
    feeds = _feeds(model, session, args, kwargs)
    try:
        got = session.run(None, feeds)
    except Exception as e:
        raise fail(e) from e
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(ref):
        raise RuntimeError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(ref)}; cannot compare them; "
                           "nothing was written")
    outputs = []
    for name, a, b in zip(names, got, ref):
        a64 = torch.from_numpy(np.asarray(a, dtype=np.float64))
        b64 = b.detach().cpu().to(torch.float64)
        if tuple(a64.shape) != tuple(b64.shape):
            raise RuntimeError(f"output {name!r}: onnxruntime shape {tuple(a64.shape)} != PyTorch "
                               f"{tuple(b64.shape)}; nothing was written")
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
