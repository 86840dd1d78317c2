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

The kernel is chosen per CPU (:mod:`nmsparse.kernels.cpu_select`): AVX-512, AVX2+FMA, or none, when
the layer decompresses its weight once and runs ``F.linear`` at every batch (``path == "dense"``).

Inference layer: the packed weight and bias are buffers and get no gradient, but gradients flow to
the input (backward multiplies by the decompressed weight), so the layer works with or without
``torch.no_grad()``. Under ``torch.compile`` / ``torch.export`` the kernel is the custom op
``torch.ops.nmsparse.nm_linear`` (:mod:`nmsparse.kernels.nm_op`); there the fallback decompresses on
every call (no cache inside a graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.kernels import cpu_nm, cpu_select, nm_op
from nmsparse.masking.pattern import NMPattern, check_nm


class NMLinear(nn.Module):
    """Linear layer ``y = x W^T + b`` with an N:M weight (n kept per m along ``in``) held packed.

    Build it with :meth:`from_linear`. Input: any shape ``(..., in_features)``, CPU, the dtype of
    the values (float32 or bfloat16); output ``(..., out_features)`` in the same dtype.
    """

    # Rows of input up to which the packed kernel runs when no measured crossover is set, per kernel and
    # values dtype (docs/inference.md): AVX-512 on a Sapphire Rapids (4096x4096: fp32 beats dense up to 24
    # rows, bf16 up to 4); AVX2 from the haswell build on a Zen 5 (fp32 wins up to 8 rows; bf16 lost at
    # batch 1 on one thread, so 0: dense). to_nm_linear measures each layer's own unless told not to.
    default_crossover: dict = {"avx512": {torch.float32: 24, torch.bfloat16: 4},
                               "avx2": {torch.float32: 8, torch.bfloat16: 0}, "dense": {}}

    def __init__(self, in_features: int, out_features: int, n: int | NMPattern, m: int | None = None, *,
                 bias: bool = True, dtype: torch.dtype = torch.float32, crossover: int | None = None,
                 cache_dense: bool = True, kernel: str | None = None):
        super().__init__()
        n, m = check_nm(n, m)
        cpu_nm.check_kernel_nm(n, m)
        cpu_select.requested(kernel)  # a bad name is an error here
        if dtype not in cpu_nm.KERNEL_DTYPES:
            raise ValueError(f"NMLinear stores float32 or bfloat16 weights, got dtype {dtype}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if in_features % m:
            raise ValueError(f"in_features {in_features} is not a multiple of m={m}")
        check_crossover(crossover)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        self._crossover = crossover
        self.kernel = kernel
        self._tuned: tuple | None = None  # (path, dtype, crossover) measured by to_nm_linear
        self._path: tuple | None = None  # (dtype, path) of the last resolution
        self.cache_dense = bool(cache_dense)
        self._dense: tuple[tuple, torch.Tensor] | None = None
        self._arrays: tuple | None = None  # the kernel's numpy views of values/masks (and what they view)
        self.register_buffer("values", torch.zeros(out_features, in_features * n // m, dtype=dtype))
        masks = torch.zeros(out_features, cpu_nm.padded_in(in_features) // cpu_nm.CHUNK, dtype=torch.int16)
        if in_features:  # a valid empty pattern: the first n columns of every group
            keep = (torch.arange(cpu_nm.padded_in(in_features)) % m < n) & (torch.arange(cpu_nm.padded_in(in_features)) < in_features)
            word = (keep.view(-1, cpu_nm.CHUNK).int() << torch.arange(cpu_nm.CHUNK)).sum(-1)
            masks = torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16).expand(out_features, -1).contiguous()
        self.register_buffer("masks", masks)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._resolve()  # a forced kernel this CPU cannot run is an error now, not at the first call

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int | NMPattern, m: int | None = None, *, name: str = "",
                    crossover: int | None = None,
                    cache_dense: bool = True, kernel: str | None = None) -> "NMLinear":
        """Pack a finalized N:M ``nn.Linear`` (at most n non-zeros in every group of m along ``in``).

        ``name`` only labels errors; ``kernel``: see :func:`nmsparse.kernels.cpu_select.choose`. Raises ``ValueError`` (naming the layer and shape) when the layer
        is not a CPU float32/bfloat16 ``nn.Linear``, n:m is not supported by the kernel (m in 2, 4, 8,
        16), ``in`` is not a multiple of m, or a group holds more than n non-zeros.
        """
        label = f"layer {name!r}" if name else "layer"
        p = check_nm(n, m)
        n, m = p
        reason = unsupported_reason(linear, p)
        if reason:
            raise ValueError(f"{label}: {reason}")
        w = linear.weight.detach()
        try:
            values, masks = cpu_nm.pack(w, n, m)
        except ValueError as err:
            raise ValueError(f"{label} {err}; finalize an N:M model first (nmsparse.sparsify + nmsparse.finalize, "
                             "or nmsparse.prune)") from None
        mod = cls(linear.in_features, linear.out_features, p, bias=linear.bias is not None, dtype=w.dtype,
                  crossover=crossover, cache_dense=cache_dense, kernel=kernel)
        mod.values, mod.masks = values, masks
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The decompressed ``(out, in)`` weight, in the values' dtype (zeros at pruned positions)."""
        return cpu_nm.unpack(self.values, self.masks, self.n, self.m, self.in_features)

    def _resolve(self) -> str:
        dtype = self.values.dtype
        if dtype not in cpu_nm.KERNEL_DTYPES:
            return "dense"  # forward refuses such a layer with its own error
        path = cpu_select.choose(self.m, dtype, self.kernel).path
        self._path = (dtype, path)
        return path

    @property
    def path(self) -> str:
        """The kernel this layer runs on this CPU: ``"avx512"``, ``"avx2"`` or ``"dense"`` (no N:M
        kernel: decompressed weight and ``F.linear`` at every batch)."""
        p = self._path
        return p[1] if p is not None and p[0] is self.values.dtype else self._resolve()

    @property
    def crossover(self) -> int:
        """Rows of input up to which the kernel runs: the constructor's value, else the one
        ``to_nm_linear`` measured for this kernel and dtype, else ``default_crossover``; 0 for dense."""
        path, dtype = self.path, self.values.dtype
        if path == "dense":
            return 0
        if self._crossover is not None:
            return self._crossover
        if self._tuned is not None and self._tuned[:2] == (path, dtype):
            return self._tuned[2]
        return self.default_crossover[path].get(dtype, 0)

    def set_measured_crossover(self, path: str, dtype: torch.dtype, crossover: int) -> None:
        """Use ``crossover`` (measured for ``path`` and ``dtype``) while the layer runs that kernel and dtype."""
        self._tuned = (path, dtype, int(crossover))

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
        p = self._path
        path = p[1] if p is not None and p[0] is dtype else self._resolve()
        compiling = torch.compiler.is_compiling()
        if x.shape[:-1].numel() > self.crossover:
            if compiling:
                w = torch.ops.nmsparse.nm_unpack(values, self.masks, self.n, self.m, self.in_features)
                return F.linear(x, w, self.bias)
            return F.linear(x, self._fallback_weight(), self.bias)
        if compiling or (torch.is_grad_enabled() and x.requires_grad):  # the custom op (autograd, graphs)
            return torch.ops.nmsparse.nm_linear(x, values, self.masks, self.bias, self.n, self.m, self.in_features,
                                                path)
        return nm_op.linear_impl(x, values, self.masks, self.bias, self.n, self.m, self.in_features, path,
                                 self._kernel_arrays())

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
            layer = f" or the layer (.to({x.dtype}))" if x.dtype in cpu_nm.KERNEL_DTYPES else ""
            raise ValueError(f"NMLinear holds {dtype} weights but got a {x.dtype} input; convert the input "
                             f"(x.to({dtype})){layer}")
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
                f"bias={self.bias is not None}, dtype={self.values.dtype}, kernel={self.path}, "
                f"crossover={self.crossover}, cache_dense={self.cache_dense}")


def _buffer_key(*tensors: torch.Tensor) -> tuple:
    """Identifies the buffers' current contents for the caches: storage, layout and in-place version.
    Inference tensors (made under ``torch.inference_mode``) keep no version counter; they count as
    unchanged while their storage is the same."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.is_contiguous())
                 for t in tensors)


def check_crossover(crossover: object) -> None:
    """``crossover``: None or an integer >= 0 (rows of input up to which the kernel runs); ``ValueError`` else."""
    if crossover is not None and (isinstance(crossover, bool) or not isinstance(crossover, int) or crossover < 0):
        raise ValueError(f"crossover must be an integer >= 0 (rows of input handled by the kernel), got {crossover!r}")


def unsupported_reason(module: nn.Module, n: int | NMPattern, m: int | None = None) -> str | None:
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
