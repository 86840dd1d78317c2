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
runs the file in onnxruntime and compares with PyTorch. A layer that is N:M in PyTorch but not along
the axis TensorRT reads is *broken*: the export fails unless ``allow_broken=True``.

The file's inputs and outputs are named and its batch (and, for token inputs, sequence) axes are
dynamic by default (:mod:`nmsparse.export.onnx_io`); onnxruntime checks it at the example's shape and
at a second one (:mod:`nmsparse.export.onnx_run`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nmsparse.export import onnx_io
from nmsparse.export.onnx_check import InitializerCheck, check_initializers
from nmsparse.export.onnx_report import OnnxReport, graph_signature
from nmsparse.export.onnx_run import compare
from nmsparse.masking.layout import check_layout
from nmsparse.masking.pattern import NMPattern, check_nm
from nmsparse.surgery.sparse_model import sparse_layers

__all__ = ["InitializerCheck", "OnnxReport", "check_initializers", "export_onnx"]

MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and later
BF16_OPSET = 22  # Conv, pooling... take bfloat16 from opset 22 on (onnx.checker: a bf16 Conv fails at 21)
_MAX_EXTERNAL = 1 << 30  # above 1 GiB of parameters the weights go to an external ``<file>.data``


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


def _require(check: bool) -> None:
    import importlib.util

    need = ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])
    missing = [k for k in need if importlib.util.find_spec(k) is None]
    if missing:
        raise ImportError(f"export_onnx needs {', '.join(missing)}: pip install 'nmsparse[onnx]'")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    kinds = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else None


def _follow_dtype(args: tuple, kwargs: dict, dtype: torch.dtype | None) -> tuple[tuple, dict]:
    """Float example inputs in the model's float dtype (integer inputs such as token ids stay as they are)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

    return tuple(cast(t) for t in args), {k: cast(t) for k, t in kwargs.items()}


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# (logger, message) pairs the exporter emits on its own, dropped during our export call only
_NOTICES = (("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
            ("onnxscript.optimizer._constant_folding", "Evaluation failed"))


@contextlib.contextmanager
def _quiet_exporter():
    """Silence, for this export only, what torch.onnx prints that is not the user's concern: one warning
    per torchvision op when torchvision is absent, the optimizer's note when it cannot fold a constant
    (it then keeps the node), a FutureWarning about torch's own pytree code, and a UserWarning for each
    dynamic axis name shared by several inputs (the name is kept)."""
    filters = [(logging.getLogger(name), _DropNotice(text)) for name, text in _NOTICES]
    for log, f in filters:
        log.addFilter(f)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
            yield
    finally:
        for log, f in filters:
            log.removeFilter(f)


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """A transformers model's ``config.use_cache`` off while exporting (the cache object is no tensor tree)."""
    tf = sys.modules.get("transformers")
    config = getattr(model, "config", None)
    on = tf is not None and isinstance(model, tf.PreTrainedModel) and getattr(config, "use_cache", False) is True
    if on:
        config.use_cache = False
    try:
        yield
    finally:
        if on:
            config.use_cache = True


def _check_axes_kept(proto, io: onnx_io.GraphInputs) -> None:
    """``RuntimeError`` when the exporter fixed an axis it was asked to keep dynamic (torch.export may
    specialize an axis to the example's size, e.g. a batch of 1 in a transformers model called without
    an attention mask, and say nothing): the file would serve that one size only."""
    dims = {v["name"]: v["shape"] for v in graph_signature(proto)["inputs"]}
    for name, ax in zip(io.names, io.axes):
        for a, axis_name in ax.items():
            got = dims.get(name, [])[a] if a < len(dims.get(name, [])) else None
            if isinstance(got, int):
                raise RuntimeError(
                    f"torch.onnx.export fixed the dynamic axis {axis_name!r} (input {name!r}, axis {a}) to the "
                    f"example's size {got}: the model's code specializes it there, so the file would take that "
                    f"size only; trace with an example of size 2 or more along it (for a transformers model, "
                    f"also pass the attention_mask), or pass dynamic=False (nmsparse export: --static); "
                    "nothing was written")


def _second_shape(sizes: dict[str, int]) -> dict[str, int]:
    """A second size for every dynamic axis: half the example's, or 3 where the example has 1."""
    return {k: v // 2 if v >= 2 else 3 for k, v in sizes.items()}


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    n: int | NMPattern,
    m: int | None = None,
    layout: str = "channels",
    opset: int | None = None,
    check: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    example_kwargs: dict | None = None,
    allow_broken: bool = False,
    dynamic: bool | Mapping[str, Mapping[int, str]] = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> OnnxReport:
    """Export a finalized N:M model (N weights kept in every group of M) to ONNX at ``path`` and check it.

    ``example_inputs``: the positional tensors of one forward pass (``example_kwargs``: keyword tensors,
    e.g. a tokenizer's ``attention_mask``); float ones are cast to the model's dtype, integer ones (token
    ids) are kept. ``dynamic=True``: axis 0 of every input is a dynamic ``batch`` axis and axis 1 of
    ``input_ids``/``attention_mask``/``token_type_ids``/``position_ids``/``inputs_embeds`` a dynamic
    ``sequence`` axis; ``False``: every shape fixed to the example's; a dict ``{input: {axis: name}}``:
    those axes. ``input_names``/``output_names`` override the names :mod:`nmsparse.export.onnx_io` picks
    (forward's parameters or ``input``; the output's keys or ``logits``). ``layout``: the layout the
    model was sparsified or pruned with. ``opset``: None for the exporter's default (>= 18; 22 for a
    bfloat16 model, the first opset whose ``Conv`` takes bfloat16).
    The model is exported in eval mode (its mode, and a transformers model's ``config.use_cache``, are
    restored) with ``torch.onnx.export(dynamo=True)``; weights stay dense initializers holding the zeros.
    Every weight initializer is checked for N:M along the axis TensorRT reads (:func:`check_initializers`);
    a PyTorch N:M layer that is not N:M there is *broken* and fails the export with a ``ValueError`` unless
    ``allow_broken=True``. With ``check=True`` the file also passes ``onnx.checker`` (full check) and
    onnxruntime (CPU) must reproduce PyTorch's outputs within ``|ort - torch| <= atol + rtol * |torch|``
    (None: 1e-4/1e-5 in float32, 1e-2/5e-3 in float16) at the example's shape and, with dynamic axes, at
    a second shape (else ``RuntimeError``); a bfloat16 file runs there upcast to float32 against the
    model in float32 (None: 2e-2/2e-2, see :data:`nmsparse.export.onnx_run.TOLERANCES`). The file is written to a temporary name and renamed: on any error nothing is
    written. Above 1 GiB of parameters the weights go to ``<path>.data`` next to it (ONNX's 2 GiB limit).
    """
    pattern = check_nm(n, m)
    n, m = pattern
    check_layout(layout)
    args, kwargs = _check_inputs(model, example_inputs, example_kwargs)
    dest = _check_path(path)
    rtol = None if rtol is None else _check_number("rtol", rtol)
    atol = None if atol is None else _check_number("atol", atol)
    for what, flag in (("check", check), ("allow_broken", allow_broken)):
        if not isinstance(flag, bool):
            raise ValueError(f"{what} must be True or False, got {flag!r}")
    _require(check)
    opset = _check_opset(opset)
    dtype = _model_dtype(model)
    if dtype == torch.bfloat16:
        if opset is not None and opset < BF16_OPSET:
            raise ValueError(f"a bfloat16 model needs opset >= {BF16_OPSET} (ONNX's Conv and pooling take bfloat16 "
                             f"from opset {BF16_OPSET} on), got opset={opset}; pass opset=None or >= {BF16_OPSET}")
        opset = opset or BF16_OPSET
    args, kwargs = _follow_dtype(args, kwargs, dtype)
    io = onnx_io.graph_inputs(model, args, kwargs, input_names, dynamic)
    import onnx

    was_training = model.training
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmpdir / dest.name
    try:
        model.eval()
        with _no_kv_cache(model):
            with torch.no_grad():
                try:
                    result = model(*args, **kwargs)
                except Exception as e:  # a shape or dtype the model does not take: the user's inputs
                    first = str(e).splitlines()[0] if str(e) else ""
                    raise ValueError(f"{type(model).__name__} fails on the example inputs ({type(e).__name__}: "
                                     f"{first}); nothing was written") from e
                outs = onnx_io.output_names(result, output_names)
            big = sum(p.numel() * p.element_size() for p in model.parameters()) > _MAX_EXTERNAL
            try:
                call_args, call_kwargs = io.call(io.widened())  # no dynamic axis traced at size 1
                with _quiet_exporter():
                    torch.onnx.export(model, call_args, str(tmp), kwargs=call_kwargs or None, dynamo=True, optimize=True,
                                      external_data=big, opset_version=opset, verbose=False,
                                      input_names=io.names, output_names=outs,
                                      dynamic_shapes=io.dynamic_shapes())
            except Exception as e:  # the exporter's own errors are long; keep the cause attached
                hint = "; pass dynamic=False (nmsparse export: --static) to export fixed shapes" if any(io.axes) else ""
                ones = sorted(k for k, v in io.sizes().items() if v == 1 and k != onnx_io.BATCH)
                if ones:  # e.g. transformers' SDPA: is_causal = (sequence > 1), a SymBool when traced at 1
                    hint += (f", or trace with an example of size 2 or more along the dynamic axis "
                             f"{ones[0]!r} (size 1 takes another code path in many models)")
                root = e  # torch.onnx wraps the cause in a TorchExportError whose first line is boilerplate
                while root.__cause__ is not None and root.__cause__ is not root:
                    root = root.__cause__
                first = re.sub(r"\x1b\[[0-9;]*m", "", str(root).splitlines()[0] if str(root) else "")
                raise RuntimeError(f"torch.onnx.export failed for {type(model).__name__}: {type(root).__name__}: "
                                   f"{first}{hint}") from e
            proto = onnx.load(str(tmp))
            _check_axes_kept(proto, io)
            if check:
                try:
                    onnx.checker.check_model(str(tmp), full_check=True)
                except Exception as e:
                    raise RuntimeError(f"the exported file fails onnx.checker: {str(e).splitlines()[0]}; "
                                       "nothing was written") from e
            checks = check_initializers(proto, model, pattern, layout=layout)
            broken = [c for c in checks if c.status == "broken"]
            if broken and not allow_broken:
                first = broken[0]
                raise ValueError(
                    f"{len(broken)} exported weight(s) break the {n}:{m} pattern TensorRT reads, first "
                    f"{first.name or first.param} ({first.param or 'no PyTorch parameter'}): {first.note}; "
                    "nothing was written (pass allow_broken=True to write the file anyway)"
                )
            shapes = [{}] + ([_second_shape(io.sizes())] if any(io.axes) else [])
            ran = compare(model, tmp, io, shapes, rtol, atol, outs) if check else {}
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, dest.parent / f.name)
    finally:
        model.train(was_training)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return OnnxReport(str(dest), n, m, layout, opset_used, checks, ran.get("outputs", []), check,
                      ran.get("rtol", 0.0), ran.get("atol", 0.0), graph_signature(proto), ran.get("runs", []),
                      ran.get("precision", ""))
