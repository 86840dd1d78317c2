"""Inference on NVIDIA sparse tensor cores: swap finalized 2:4 Linear weights for PyTorch's
semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse.kernels.semi_structured import CudaOps, shape_problem
from nmsparse.masking.nm import is_nm
from nmsparse.surgery.selection import LayerEntry, SparsityReport


def _reason(mod: nn.Linear, need_cuda: bool) -> str | None:
    """Why this Linear's weight cannot become a semi-structured tensor, or None."""
    w = mod.weight
    if isinstance(w, torch.sparse.SparseSemiStructuredTensor):
        return "already a semi-structured tensor"
    if need_cuda and not w.is_cuda:
        return f"weight on {w.device}: move the model to CUDA first"
    problem = shape_problem(tuple(w.shape), w.dtype)
    if problem:
        if w.dtype not in (torch.float16, torch.bfloat16):
            return f"{problem}: convert the model first (model.half() or model.bfloat16())"
        return problem
    if not is_nm(w, 2, 4, dim=1):
        return "weight is not 2:4 along its input features (not a finalized 2:4 layer)"
    return None


def semi_structured_plan(model: nn.Module, *, need_cuda: bool = True) -> list[LayerEntry]:
    """Which ``nn.Linear`` weights of ``model`` :func:`to_semi_structured` would convert, and why the
    others stay dense. Pure planning (nothing is modified); ``need_cuda=False`` skips the device check.

    Raises ``ValueError`` when a layer still carries the N:M training machinery (call
    :func:`nmsparse.finalize` first).
    """
    entries = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if parametrize.is_parametrized(mod, "weight"):
            raise ValueError(
                f"layer {name or '<root>'} still has a parametrized (training) weight; call "
                "nmsparse.finalize(model) before to_semi_structured"
            )
        reason = _reason(mod, need_cuda)
        param = f"{name}.weight" if name else "weight"
        entries.append(LayerEntry(name, param, "Linear", tuple(mod.weight.shape), reason is None, reason or ""))
    return entries


def to_semi_structured(model: nn.Module, *, backend: str = "auto") -> SparsityReport:
    """Swap every finalized 2:4 ``nn.Linear`` weight of ``model`` (in place) for PyTorch's
    semi-structured sparse tensor, for inference on sparse tensor cores, and return a report.

    A layer is converted when its weight is 2:4 along the input features (N = 2 kept of every 4, as
    :func:`nmsparse.finalize` leaves it), float16 or bfloat16, on CUDA, and of a shape the kernels
    accept (multiples of 32 x 64, see :func:`nmsparse.kernels.shape_problem`); every other Linear stays
    dense with its reason in the report. ``backend``: ``"auto"`` (what ``to_sparse_semi_structured``
    picks: cuSPARSELt when available), ``"cusparselt"`` or ``"cutlass"``. Converted weights no longer
    train (``requires_grad=False``).

    Raises ``RuntimeError`` without CUDA, ``ValueError`` for a model that is not finalized; both
    before anything is changed.
    """
    ops = CudaOps(backend)
    entries = semi_structured_plan(model, need_cuda=False)  # the finalize check comes first
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs CUDA: PyTorch's 2:4 semi-structured kernels run on NVIDIA GPUs "
            "(compute capability 8.0 or newer) and torch.cuda.is_available() is False here; on a CPU "
            "keep the finalized dense model"
        )
    entries = semi_structured_plan(model)
    modules = dict(model.named_modules())
    for device in {modules[e.name].weight.device for e in entries if e.sparse}:
        ops.check_device(device)
    for e in entries:
        if e.sparse:
            mod = modules[e.name]
            mod.weight = nn.Parameter(ops.compress(mod.weight.detach()), requires_grad=False)
    return SparsityReport(2, 4, entries, {"backend": f"semi-structured ({backend})"})
