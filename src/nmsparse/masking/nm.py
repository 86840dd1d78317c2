"""N:M masks as pure tensor functions.

N is the number of weights **kept** in every group of M consecutive entries along one dimension.

Ranking is by magnitude, computed on the bit pattern of ``|w|``: for IEEE floats the sign-cleared bits
order exactly like the magnitudes, every NaN is mapped to one key above infinity (so NaN ranks as the
largest magnitude), and ties go to the lower index. On CPU the ranking runs in a compiled numba kernel
(one pass over memory); elsewhere in a vectorised torch path that gives identical results.
"""

from __future__ import annotations

import torch

from nmsparse.masking.pattern import NMPattern, check_nm  # noqa: F401 - check_nm re-exported: the boundary check

try:  # numba is a hard dependency; the guard keeps the torch path usable where it cannot load.
    from nmsparse.masking import rank_kernels as _kernels
except ImportError:  # pragma: no cover - exercised only on broken installs
    _kernels = None

# float dtype -> (integer view dtype, mask clearing the sign bit, key of +inf)
_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
}

# Above this many elements a CPU tensor goes to the numba kernel; below it the torch path is as fast.
_KERNEL_MIN_NUMEL = 1 << 14


def _check_dim(t: torch.Tensor, dim: int, m: int, what: str) -> int:
    if t.dim() == 0:
        raise ValueError(f"{what} needs a tensor with at least one dimension, got a scalar")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(t.shape)}")
    dim = dim % t.dim()
    size = t.shape[dim]
    if size % m:
        raise ValueError(
            f"size {size} along dim {dim} of a tensor of shape {tuple(t.shape)} is not a multiple "
            f"of m={m}; choose an m that divides {size} or pad the tensor"
        )
    return dim


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys that order like ``|x|``, with every NaN one key above ``inf``.

    Returns a signed integer tensor of the same shape (int16/int32/int64 by the float width).
    """
    int_dtype, abs_bits, inf_key = _BITS[x.dtype]
    return (x.contiguous().view(int_dtype) & abs_bits).clamp_max_(inf_key + 1)


def _rank_mask_torch(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask for keys of shape (G, m): rank < n, ties to the lower index."""
    out = torch.empty(keys.shape, dtype=torch.bool, device=keys.device)
    lower = torch.ones(m, m, dtype=torch.bool, device=keys.device).tril_(-1)  # [i, j]: j < i
    # bound the (G, m, m) temporaries; on CUDA a larger bound saves kernel launches (16x fewer at 4096^2)
    step = max(1, (1 << (26 if keys.is_cuda else 22)) // (m * m))
    for s in range(0, keys.shape[0], step):
        g = keys[s : s + step]
        ki, kj = g.unsqueeze(2), g.unsqueeze(1)
        beats = (kj > ki) | ((kj == ki) & lower)  # entry j ranks before entry i
        out[s : s + step] = beats.sum(-1) < n
    return out


def nm_mask(w: torch.Tensor, n: int | NMPattern, m: int | None = None, dim: int = -1) -> torch.Tensor:
    """N:M keep-mask of ``w``: in every group of ``m`` consecutive entries along ``dim``, exactly
    ``n`` are True, those of the ``n`` largest ``|w|``. ``n`` may be an :class:`NMPattern` (``m`` left out).

    Ties go to the lower index; NaN ranks as the largest magnitude. ``w`` may have any float dtype,
    device and number of dimensions; ``w.shape[dim]`` must be a multiple of ``m``. Returns a
    ``torch.bool`` tensor of ``w``'s shape on ``w``'s device.
    """
    n, m = check_nm(n, m)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"nm_mask needs a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _BITS:
        raise ValueError(
            f"nm_mask needs a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got dtype {w.dtype}; convert it first, e.g. w.float()"
        )
    dim = _check_dim(w, dim, m, "nm_mask")
    x = w.detach().movedim(dim, -1).contiguous()
    if x.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    if x.device.type == "cpu" and _kernels is not None and x.numel() >= _KERNEL_MIN_NUMEL:
        mask = _kernels.nm_mask_cpu(x, n, m, *_BITS[x.dtype])
    else:
        mask = _rank_mask_torch(magnitude_keys(x).view(-1, m), n, m).view(x.shape)
    return mask.movedim(-1, dim)


def is_nm(t: torch.Tensor, n: int | NMPattern, m: int | None = None, dim: int = -1) -> bool:
    """True when every group of ``m`` consecutive entries of ``t`` along ``dim`` holds at most
    ``n`` non-zeros (NaN counts as non-zero). ``t`` may be a weight or a boolean mask; ``n`` may be
    an :class:`NMPattern` (``m`` left out)."""
    n, m = check_nm(n, m)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"is_nm needs a torch.Tensor, got {type(t).__name__}")
    dim = _check_dim(t, dim, m, "is_nm")
    nz = (t.detach() != 0).movedim(dim, -1).reshape(-1, m)
    return bool((nz.sum(-1) <= n).all())
