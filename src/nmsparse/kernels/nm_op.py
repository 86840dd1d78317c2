"""The N:M CPU kernel as PyTorch custom ops, so ``torch.compile`` and ``torch.export`` see one opaque op.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.

* ``torch.ops.nmsparse.nm_linear(x, values, masks, bias, n, m, in_features, path)``: ``x @ W.T + b`` for
  ``x`` of shape ``(..., in)`` in the values' dtype, with the packed weight (``path``: ``"avx512"`` or
  ``"avx2"``, see :mod:`nmsparse.kernels.cpu_select`); fp32 accumulation, one rounding to the values'
  dtype. A ``path`` this CPU cannot run natively (a graph exported on another CPU) is replaced by
  the one :func:`~nmsparse.kernels.cpu_select.choose` picks here, or by the decompressed weight and
  ``F.linear``. Its backward gives the input gradient (the buffers get none).
* ``torch.ops.nmsparse.nm_unpack(values, masks, n, m, in_features)``: the decompressed ``(out, in)``
  weight (the dense fallback inside compiled graphs).

Both have fake (meta) implementations giving the output's shape and dtype without running numba,
which is what dynamo and ``torch.export`` trace through; numba's dispatcher never appears in a graph.
"""

from __future__ import annotations

import torch

from nmsparse.kernels import cpu_nm, cpu_select


def linear_impl(x: torch.Tensor, values: torch.Tensor, masks: torch.Tensor, bias: torch.Tensor | None, n: int,
                m: int, in_features: int, path: str, arrays: tuple | None = None) -> torch.Tensor:
    """The kernel product with bias in the values' dtype (eager layers call this directly, with their
    cached numpy views as ``arrays``)."""
    dtype = values.dtype
    lead = x.shape[:-1]
    y = cpu_nm.nm_matmul(x.reshape(-1, in_features).float(), values, masks, n, m, in_features, arrays, path=path)
    if bias is not None:
        y = y.add_(bias) if dtype is torch.float32 else y + bias.float()
    return y.to(dtype).reshape(*lead, masks.shape[0])


@torch.library.custom_op("nmsparse::nm_linear", mutates_args=(), device_types="cpu")
def nm_linear(x: torch.Tensor, values: torch.Tensor, masks: torch.Tensor, bias: torch.Tensor | None, n: int, m: int,
              in_features: int, path: str) -> torch.Tensor:
    if path not in ("avx512", "avx2") or cpu_select.missing(path, values.dtype, cpu_select.host_cpu()):
        # a graph exported on another CPU: run what this one has (never a scalar lowering)
        path = cpu_select.choose(m, values.dtype, "auto").path
    if path == "dense":
        w = cpu_nm.unpack(values, masks, n, m, in_features)
        return torch.nn.functional.linear(x, w, bias)
    y = linear_impl(x, values, masks, bias, n, m, in_features, path)
    return y if y._base is None else y.clone()  # a custom op's output may not alias anything


@nm_linear.register_fake
def _nm_linear_fake(x, values, masks, bias, n, m, in_features, path):
    return x.new_empty(*x.shape[:-1], masks.shape[0], dtype=values.dtype)


@torch.library.custom_op("nmsparse::nm_unpack", mutates_args=(), device_types="cpu")
def nm_unpack(values: torch.Tensor, masks: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    return cpu_nm.unpack(values, masks, n, m, in_features)


@nm_unpack.register_fake
def _nm_unpack_fake(values, masks, n, m, in_features):
    return values.new_empty(masks.shape[0], in_features)


def _setup(ctx, inputs, output):
    x, values, masks, bias, n, m, in_features, path = inputs
    ctx.save_for_backward(values, masks)
    ctx.nm = (n, m, in_features, x.dtype)


def _backward(ctx, grad):
    values, masks = ctx.saved_tensors
    n, m, in_features, dtype = ctx.nm
    w = torch.ops.nmsparse.nm_unpack(values, masks, n, m, in_features).float()
    return (grad.float() @ w).to(dtype), None, None, None, None, None, None, None


nm_linear.register_autograd(_backward, setup_context=_setup)
