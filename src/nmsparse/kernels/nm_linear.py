"""``NMLinear``: a Linear layer whose N:M weight is stored packed and multiplied without decompressing.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.

The weight lives in two buffers in the layout of :mod:`nmsparse.kernels.cpu_nm` (``values``
``(out, in*n/m)`` in the weight's dtype and ``masks`` ``(out, ceil(in/16))`` int16 bit masks), so
``state_dict`` / ``load_state_dict`` work and ``.to(torch.bfloat16)`` converts the values. Up to
``crossover`` rows of input (the product of the leading dimensions) the forward runs the numba
kernel; above it, dense BLAS wins on a CPU, so the layer decompresses its weight and calls
``F.linear``. With ``cache_dense=True`` (default) the decompressed weight is kept after the first
batch above the crossover (built lazily: a layer that only ever sees small batches holds only the
packed weight; one that sees a large batch holds packed + dense from then on, and runs exactly as
fast as dense there; :meth:`NMLinear.release_dense` drops it). With ``cache_dense=False`` it
decompresses on every large call and never holds the dense weight: decompressing 4096x4096 costs
about two dense batch-1 products, so mid-size batches are then markedly slower than dense (see
``docs/inference.md``).

Inference layer: the packed weight and bias are buffers and get no gradient, but gradients flow to
the input (backward multiplies by the decompressed weight), so the layer works with or without
``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.kernels import cpu_nm
from nmsparse.nmmasks import check_nm


class _PackedMatmul(torch.autograd.Function):
    """fp32 ``x @ W.T`` with the packed weight; backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, x2d, values, masks, n, m, in_features, arrays):  # type: ignore[override]
        ctx.packed = (values, masks, n, m, in_features)
        return cpu_nm.nm_matmul(x2d, values, masks, n, m, in_features, arrays)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, masks, n, m, in_features = ctx.packed
        w = cpu_nm.unpack(values, masks, n, m, in_features).float()
        return grad_out @ w, None, None, None, None, None, None


class NMLinear(nn.Module):
    """Linear layer ``y = x W^T + b`` with an N:M weight (n kept per m along ``in``) held packed.

    Build it with :meth:`from_linear`. Input: any shape ``(..., in_features)``, CPU, the dtype of
    the values (float32 or bfloat16); output ``(..., out_features)`` in the same dtype.
    """

    # Rows of input up to which the packed kernel runs, per values dtype (measured with
    # benchmarks/bench_nm_linear.py on 4096x4096, docs/inference.md: fp32 beats dense up to 24 rows and
    # is even at 32; bf16 beats dense up to 4 rows and loses from 5, where oneDNN's bf16 matmul is fast).
    default_crossover: dict = {torch.float32: 24, torch.bfloat16: 4}

    def __init__(self, in_features: int, out_features: int, n: int, m: int, *, bias: bool = True,
                 dtype: torch.dtype = torch.float32, crossover: int | None = None, cache_dense: bool = True):
        super().__init__()
        n, m = check_nm(n, m)
        cpu_nm.check_kernel_nm(n, m)
        if dtype not in cpu_nm.KERNEL_DTYPES:
            raise ValueError(f"NMLinear stores float32 or bfloat16 weights, got dtype {dtype}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if in_features % m:
            raise ValueError(f"in_features {in_features} is not a multiple of m={m}")
        if crossover is not None and (isinstance(crossover, bool) or not isinstance(crossover, int) or crossover < 0):
            raise ValueError(f"crossover must be an integer >= 0 (rows of input handled by the kernel), got {crossover!r}")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        self._crossover = crossover
        self.cache_dense = bool(cache_dense)
        self._dense: tuple[tuple, torch.Tensor] | None = None
        self._arrays: tuple | None = None  # the kernel's numpy views of values/masks (and what they view)
        self.register_buffer("values", torch.zeros(out_features, in_features * n // m, dtype=dtype))
        masks = torch.zeros(out_features, cpu_nm.padded_in(in_features) // cpu_nm.CHUNK, dtype=torch.int16)
        if in_features:  # a valid empty pattern: the first n columns of every group
            first = torch.zeros(out_features, cpu_nm.padded_in(in_features), dtype=torch.float32)
            first[:, :in_features].view(out_features, -1, m)[..., :n] = 1
            masks = cpu_nm.pack(first[:, :in_features], n, m)[1]
        self.register_buffer("masks", masks)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int, m: int, *, name: str = "", crossover: int | None = None,
                    cache_dense: bool = True) -> "NMLinear":
        """Pack a finalized N:M ``nn.Linear`` (at most n non-zeros in every group of m along ``in``).

        ``name`` only labels errors. Raises ``ValueError`` (naming the layer and shape) when the layer
        is not a CPU float32/bfloat16 ``nn.Linear``, n:m is not supported by the kernel (m in 2, 4, 8,
        16), ``in`` is not a multiple of m, or a group holds more than n non-zeros.
        """
        label = f"layer {name!r}" if name else "layer"
        reason = unsupported_reason(linear, n, m)
        if reason:
            raise ValueError(f"{label}: {reason}")
        w = linear.weight.detach()
        counts = cpu_nm.nonzero_counts(w, m)
        if bool((counts > n).any()):
            r, g = (int(i) for i in (counts > n).nonzero()[0])
            raise ValueError(
                f"{label} weight {tuple(w.shape)} is not {n}:{m} along in: row {r}, group {g} (columns "
                f"{g * m}..{g * m + m - 1}) has {int(counts[r, g])} non-zeros; finalize an N:M model first "
                "(nmsparse.sparsify + nmsparse.finalize, or nmsparse.prune)"
            )
        mod = cls(linear.in_features, linear.out_features, n, m, bias=linear.bias is not None, dtype=w.dtype,
                  crossover=crossover, cache_dense=cache_dense)
        mod.values, mod.masks = cpu_nm.pack(w, n, m)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The decompressed ``(out, in)`` weight, in the values' dtype (zeros at pruned positions)."""
        return cpu_nm.unpack(self.values, self.masks, self.n, self.m, self.in_features)

    @property
    def crossover(self) -> int:
        """Rows of input up to which the kernel runs (the constructor's value, else by dtype)."""
        if self._crossover is not None:
            return self._crossover
        return self.default_crossover.get(self.values.dtype, 0)

    def release_dense(self) -> None:
        """Drop the cached decompressed weight (``cache_dense``); the next large batch rebuilds it."""
        self._dense = None

    def _fallback_weight(self) -> torch.Tensor:
        if not self.cache_dense:
            self._dense = None
            return self.dense_weight()
        key = _buffer_key(self.values, self.masks)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.dense_weight())
        return self._dense[1]

    def _kernel_arrays(self) -> tuple:
        """The numpy views the kernel reads. They share memory with the buffers, so in-place changes
        show through; they are rebuilt when a buffer is replaced (another tensor, or new storage)."""
        v, mk = self.values, self.masks
        cached = self._arrays
        if (cached is not None and cached[0] is v and cached[1] is mk and cached[2] == v.data_ptr()
                and cached[3] == mk.data_ptr()):
            return cached[4]
        arrays = cpu_nm.packed_arrays(v, mk)
        if v.is_contiguous() and mk.is_contiguous():  # views, not copies: safe to keep
            self._arrays = (v, mk, v.data_ptr(), mk.data_ptr(), arrays)
        return arrays

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values
        dtype = values.dtype
        if not (type(x) is torch.Tensor and x.dtype is dtype and x.dim() > 0 and x.shape[-1] == self.in_features
                and dtype in cpu_nm.KERNEL_DTYPES and x.device.type == "cpu" and values.device.type == "cpu"):
            self._check_input(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] > self.crossover:
            return F.linear(x, self._fallback_weight(), self.bias)
        x2d = x2d.float()
        if torch.is_grad_enabled() and x2d.requires_grad:
            y = _PackedMatmul.apply(x2d, values, self.masks, self.n, self.m, self.in_features, self._kernel_arrays())
        else:  # inference: no autograd node to build
            y = cpu_nm.nm_matmul(x2d, values, self.masks, self.n, self.m, self.in_features, self._kernel_arrays())
        if self.bias is not None:
            y = y.add_(self.bias) if dtype is torch.float32 else y + self.bias.float()
        return y.to(dtype).reshape(*lead, self.out_features)

    def _check_input(self, x) -> None:
        """One clear error for an input (or a layer state) the kernel cannot run."""
        dtype = self.values.dtype
        if dtype not in cpu_nm.KERNEL_DTYPES:
            raise ValueError(f"NMLinear runs float32 or bfloat16 weights, this one holds {dtype}; "
                             "convert it with .float() or .to(torch.bfloat16)")
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"NMLinear expects input (..., {self.in_features}), got {shape}")
        if x.dtype != dtype:
            raise ValueError(f"NMLinear holds {dtype} weights but got a {x.dtype} input; convert the input "
                             f"(x.to({dtype})) or the layer (.to({x.dtype}))")
        if x.device.type != "cpu" or self.values.device.type != "cpu":
            raise ValueError(f"NMLinear runs on the CPU; got input on {x.device}, weights on {self.values.device}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        vals, masks = state_dict.get(prefix + "values"), state_dict.get(prefix + "masks")
        if isinstance(vals, torch.Tensor) and isinstance(masks, torch.Tensor):
            problem = packed_problem(vals, masks, self.n, self.m, self.in_features, self.out_features)
            if problem:
                raise ValueError(f"{prefix or 'NMLinear '}state_dict: {problem}; the module is unchanged")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, m={self.m}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}, crossover={self.crossover}, "
                f"cache_dense={self.cache_dense}")


def _buffer_key(*tensors: torch.Tensor) -> tuple:
    """Identifies the buffers' current contents for the caches: storage, layout and in-place version.
    Inference tensors (made under ``torch.inference_mode``) keep no version counter; they count as
    unchanged while their storage is the same."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.is_contiguous())
                 for t in tensors)


def unsupported_reason(module: nn.Module, n: int, m: int) -> str | None:
    """Why ``module`` cannot become an :class:`NMLinear` with n:m (its weight content aside), or None."""
    n, m = check_nm(n, m)
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    w = module.weight
    if m not in cpu_nm.KERNEL_M:
        return f"m={m} is not supported by the CPU kernel (m in {cpu_nm.KERNEL_M})"
    if w.dtype not in cpu_nm.KERNEL_DTYPES:
        return f"weight dtype {w.dtype} is not supported by the CPU kernel (float32, bfloat16)"
    if w.device.type != "cpu":
        return f"weight is on {w.device}; the N:M kernel runs on the CPU"
    if w.shape[1] % m:
        return f"input features {w.shape[1]} (weight {tuple(w.shape)}) is not a multiple of m={m}"
    return None


def packed_problem(values: torch.Tensor, masks: torch.Tensor, n: int, m: int, in_features: int,
                   out_features: int) -> str | None:
    """What is wrong with packed tensors for this layer (shapes, dtypes, bit counts), or None.

    The kernel trusts the masks to hold exactly n bits per group of m (that is how many values each
    chunk consumes), so a bad mask is refused here rather than read out of bounds."""
    want_v = (out_features, in_features * n // m)
    want_m = (out_features, cpu_nm.padded_in(in_features) // cpu_nm.CHUNK)
    if tuple(values.shape) != want_v or values.dtype not in cpu_nm.KERNEL_DTYPES:
        return f"values must be float32/bfloat16 of shape {want_v}, got {values.dtype} {tuple(values.shape)}"
    if tuple(masks.shape) != want_m or masks.dtype != torch.int16:
        return f"masks must be int16 of shape {want_m}, got {masks.dtype} {tuple(masks.shape)}"
    bits = ((masks.to(torch.int32).unsqueeze(-1) >> torch.arange(cpu_nm.CHUNK, dtype=torch.int32)) & 1)
    bits = bits.reshape(out_features, -1)
    if bool(bits[:, in_features:].any()):
        return f"masks set bits past column {in_features}"
    counts = bits[:, :in_features].reshape(out_features, -1, m).sum(-1)
    if bool((counts != n).any()):
        r, g = (int(i) for i in (counts != n).nonzero()[0])
        return f"masks row {r}, group {g} has {int(counts[r, g])} bits set, need exactly n={n}"
    return None
