"""The sparse training matmul of one N:M Linear layer: ``y = x @ (E*W)^T + b`` on 2:4 kernels.

Of a Linear layer's three training matmuls, two can run on 2:4 sparse kernels:

* forward ``y = x @ (E*W)^T``: the compressed ``E*W`` (2:4 along ``in``) is the sparse operand;
* input gradient ``dx = dy @ (E*W)``: the compressed ``(E*W)^T`` is the sparse operand, which is 2:4
  along its rows (``out``) only when the mask is transposable (see :mod:`nmsparse.masking.transposable`);
  otherwise this matmul is dense;
* the weight gradient ``dy^T @ x`` has no 2:4 operand and stays dense.

``E*W`` and its transpose are compressed again on every call (the values change every step; the
mask changes when the layer's parametrization refreshes it). The weight gradient then follows the
layer's method exactly as the masked-dense path (:mod:`nmsparse.surgery.parametrization`): ``"ste"``
``dW = d(E*W)``; ``"srste"`` ``dW = d(E*W) + decay * (~E) * W``; ``"fixed"`` ``dW = E * d(E*W)``.

Mixed precision. The kernels exist for float16 and bfloat16 only. The compute dtype is the autocast
dtype of the input's device when autocast is on there, else the input's dtype. :func:`semi_structured_linear`
does the casts autocast would do (``x``, ``E*W`` and ``b`` to the compute dtype; the weight gradient
comes back in the master weight's dtype, e.g. float32) and runs the autograd function with autocast
off. (``torch.amp.custom_fwd(cast_inputs=...)`` does not fit: it binds one device type when the
function is defined, and it would also cast the fp32 master weight used by the SR-STE term.) With a
float32 compute dtype there is no 2:4 kernel and the call is exactly the masked-dense ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmsparse.kernels.semi_structured import SUPPORTED_DTYPES, ops_for
from nmsparse.surgery.parametrization import METHODS, sparse_weight


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input ``x``: autocast's if on for ``x``'s device."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _rule(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, method: str, decay: float) -> torch.Tensor:
    if method == "ste":
        return grad
    if method == "srste":
        return grad + decay * (~mask) * weight
    return grad * mask


class _SemiStructuredLinear(torch.autograd.Function):
    """``x (…, in)`` and ``bias`` already in the compute dtype; ``weight`` (out, in) in the master dtype."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, method, decay, sparse_input_grad):
        cdt = x.dtype
        ops = ops_for(x.device)
        ew = weight.to(cdt) * mask  # == (weight * mask).to(cdt) bit for bit, with less memory traffic
        x2 = x.reshape(-1, x.shape[-1])
        y = ops.linear(x2, ops.compress(ew), bias)
        # E*W in the compute dtype is kept for the input gradient, as F.linear keeps its cast weight
        ctx.save_for_backward(x, ew, weight, mask)
        ctx.method, ctx.decay, ctx.sparse_input_grad = method, decay, sparse_input_grad
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, ew, weight, mask = ctx.saved_tensors
        cdt = x.dtype
        dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
        x2 = x.reshape(-1, x.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.sparse_input_grad:
                ops = ops_for(x.device)
                dx2 = ops.linear(dy2, ops.compress(ew.t().contiguous()))
            else:
                dx2 = dy2 @ ew
            dx = dx2.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _rule((dy2.t() @ x2).to(weight.dtype), weight, mask, ctx.method, ctx.decay)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0)
        return dx, dw, None, db, None, None, None


def semi_structured_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    method: str = "srste",
    decay: float = 0.0,
    sparse_input_grad: bool = False,
) -> torch.Tensor:
    """``x @ (mask * weight)^T + bias`` with the forward (and, with ``sparse_input_grad``, the input
    gradient) on 2:4 semi-structured kernels; gradients as the masked-dense path of ``method``.

    ``x`` is ``(..., in)``; ``weight`` ``(out, in)`` is the dense (master) weight, ``mask`` its bool
    keep-mask, 2:4 along ``in`` (N = 2 kept per 4); ``sparse_input_grad=True`` requires ``mask`` to
    be transposable 2:4 (2:4 along ``out`` too). Kernels: CUDA's on CUDA tensors, the CPU emulation
    elsewhere (see :mod:`nmsparse.kernels.semi_structured`). When the compute dtype (see
    :func:`compute_dtype`) is not float16/bfloat16 this is the plain masked-dense ``F.linear``.
    Shapes must meet :func:`nmsparse.kernels.semi_structured.shape_problem` for ``(out, in)`` (and
    ``(in, out)`` with ``sparse_input_grad``); callers check that once per layer.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cdt = compute_dtype(x)
    if cdt not in SUPPORTED_DTYPES:
        return F.linear(x, sparse_weight(weight, mask, method, decay), bias)
    xc = x.to(cdt)
    bc = None if bias is None else bias.to(cdt)
    with torch.autocast(x.device.type, enabled=False):
        return _SemiStructuredLinear.apply(xc, weight, mask, bc, method, float(decay), bool(sparse_input_grad))
