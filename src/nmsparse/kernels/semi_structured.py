"""2:4 semi-structured matmuls behind one small interface, with two implementations.

The operations the sparse training step and sparse inference need are

* :meth:`SemiStructuredOps.compress` ``(rows, cols)`` 2:4 matrix (at most 2 non-zeros in every group of 4
  consecutive entries of each row; N = 2 kept of M = 4) -> an opaque compressed handle;
* :meth:`SemiStructuredOps.linear` ``x (B, cols) @ A^T (+ bias) -> (B, rows)``, with the **sparse matrix
  ``A`` as the first operand of the hardware matmul** (CUTLASS and cuSPARSELt only accept the sparse
  operand there: the kernel computes ``A @ x^T`` and the transpose is fused);
* :meth:`SemiStructuredOps.decompress` handle -> the dense matrix (tests, reports).

Implementations:

``CudaOps``
    PyTorch's semi-structured tensor subclasses (``torch.sparse.SparseSemiStructuredTensorCUSPARSELT``,
    the default of ``torch.sparse.to_sparse_semi_structured``, or ``...CUTLASS``), whose ``linear``
    dispatches to ``torch._cslt_sparse_mm`` / ``torch._sparse_semi_structured_addmm``, padding the dense
    operand to the kernels' minimum sizes. CUDA tensors only. PyTorch's CUTLASS matmuls run on compute
    capability 8.x only (:func:`cutlass_supported`); on Hopper (H100, H200) only cuSPARSELt runs.
``EmulatedOps``
    The CPU emulation: PyTorch's own CUTLASS packing functions
    (``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass`` and its
    inverse, plain torch code that runs on any device) pack the matrix, unpack it, and a dense
    ``F.linear`` multiplies. Any packing error (a group with more than 2 non-zeros is silently
    truncated by the packing) therefore shows up as a wrong result in the CPU tests.

:func:`ops_for` picks ``CudaOps`` for CUDA tensors and ``EmulatedOps`` otherwise; :func:`force_emulation`
makes every caller use the emulation (tests, and the reference on a GPU).

Dtypes: float16 and bfloat16 only. (Torch's float32 semi-structured format is 1:2, not 2:4, and
cuSPARSELt has no float32 kernel, so a float32 2:4 matrix has no sparse kernel.) Shapes: both sizes
must be multiples of (and at least) the CUTLASS minimum of torch's ``_DTYPE_SHAPE_CONSTRAINTS``,
(32 rows, 64 columns) for float16/bfloat16, which also satisfies cuSPARSELt's (16, 16): see
:func:`shape_problem`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.nn.functional as F

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_state = threading.local()


def _constraints(dtype: torch.dtype) -> tuple[int, int]:
    """(min rows, min cols) of a sparse operand of ``dtype``: the stricter of torch's two backends."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CSLT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as CUTLASS

    rows = cols = 1
    for cls in (CUTLASS, CSLT):
        c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
        rows, cols = max(rows, c.sparse_min_rows), max(cols, c.sparse_min_cols)
    return rows, cols


def shape_problem(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why a sparse operand of ``shape`` and ``dtype`` cannot be compressed, or None when it can.

    The operand is the ``(rows, cols)`` matrix whose rows hold the 2:4 groups (a Linear weight
    ``(out, in)`` for the forward; its transpose ``(in, out)`` for the input gradient).
    """
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} has no 2:4 semi-structured kernel (float16 and bfloat16 only)"
    if len(shape) != 2:
        return f"needs a 2-D matrix, got shape {tuple(shape)}"
    r, c = _constraints(dtype)
    rows, cols = shape
    if rows < r or rows % r or cols < c or cols % c:
        return f"shape {rows}x{cols} is not a multiple of the kernels' minimum {r}x{c}"
    return None


def _check_operand(a: torch.Tensor) -> None:
    problem = shape_problem(tuple(a.shape), a.dtype)
    if problem:
        raise ValueError(f"cannot compress a 2:4 semi-structured matrix: {problem}")


class SemiStructuredOps:
    """Interface: compress a 2:4 matrix, multiply by it, decompress it (see the module doc)."""

    name = "abstract"

    def compress(self, a: torch.Tensor) -> Any:
        """Compress the ``(rows, cols)`` float16/bfloat16 matrix ``a``, 2:4 along its rows."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, handle: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, cols) @ A^T + bias -> (B, rows)``; ``x`` and ``bias`` have the matrix's dtype."""
        raise NotImplementedError

    def decompress(self, handle: Any) -> torch.Tensor:
        """The dense ``(rows, cols)`` matrix of ``handle``."""
        raise NotImplementedError


class EmulatedOps(SemiStructuredOps):
    """CUTLASS packing with torch's own Python functions, then unpack and a dense matmul (any device)."""

    name = "emulated"

    def compress(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        _check_operand(a)
        return sparse_semi_structured_from_dense_cutlass(a.contiguous())

    def decompress(self, handle: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

        return sparse_semi_structured_to_dense_cutlass(*handle)

    def linear(self, x, handle, bias=None):
        return F.linear(x, self.decompress(handle), bias)


class CudaOps(SemiStructuredOps):
    """PyTorch's semi-structured tensor subclass on CUDA: cuSPARSELt (``backend="cusparselt"``, what
    ``to_sparse_semi_structured`` uses when available) or CUTLASS (``backend="cutlass"``)."""

    name = "cuda"

    def __init__(self, backend: str = "auto") -> None:
        if backend not in ("auto", "cusparselt", "cutlass"):
            raise ValueError(f"backend must be 'auto', 'cusparselt' or 'cutlass', got {backend!r}")
        self.backend = backend

    def _cls(self):
        from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
        from torch.sparse import SparseSemiStructuredTensorCUTLASS

        backend = self.backend
        if backend == "auto":
            cslt = getattr(torch.backends, "cusparselt", None)
            use_cslt = cslt is not None and cslt.is_available() and not SparseSemiStructuredTensor._FORCE_CUTLASS
            backend = "cusparselt" if use_cslt else "cutlass"
        return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS

    def compress(self, a):
        if not a.is_cuda:
            raise ValueError(f"CudaOps needs CUDA tensors, got a tensor on {a.device}; use EmulatedOps")
        _check_operand(a)
        self.check_device(a.device)
        return self._cls().from_dense(a.contiguous())

    def check_device(self, device: torch.device | str) -> None:
        """Raise ``RuntimeError`` when this back end's kernels cannot run on the CUDA ``device``."""
        if self._cls().BACKEND == "cutlass" and not cutlass_supported(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise RuntimeError(
                f"PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only (A100, A10, RTX 30/40) "
                f"and cuSPARSELt is not selected or not available; this GPU is {major}.{minor}: use "
                "backend='cusparselt' (or 'auto' with a PyTorch built with cuSPARSELt)"
            )

    def decompress(self, handle):
        return handle.to_dense()

    def linear(self, x, handle, bias=None):
        return F.linear(x, handle, bias)


def cutlass_supported(device: torch.device | str | int | None = None) -> bool:
    """True when PyTorch's CUTLASS 2:4 matmuls run on this CUDA device (compute capability 8.x only:
    ``torch._sparse_semi_structured_mm`` refuses others, Hopper included)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 8


_EMULATED = EmulatedOps()
_CUDA = CudaOps()


@contextlib.contextmanager
def force_emulation(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread), :func:`ops_for` returns the CPU emulation for every device."""
    old = getattr(_state, "force", False)
    _state.force = enabled
    try:
        yield
    finally:
        _state.force = old


def ops_for(device: torch.device | str) -> SemiStructuredOps:
    """``CudaOps`` for a CUDA device, ``EmulatedOps`` otherwise or inside :func:`force_emulation`."""
    if torch.device(device).type == "cuda" and not getattr(_state, "force", False):
        return _CUDA
    return _EMULATED
