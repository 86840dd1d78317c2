"""The public functions of transposable N:M masks, their input checks, and the choice of path.

:func:`transposable_mask`, :func:`transposable_stats`, :func:`transposable_layer_mask` compute masks;
:func:`is_transposable_nm`, :func:`layer_is_transposable_nm` check them; :func:`check_method` and
:data:`METHODS` name the two methods. Each public function checks its ``n, m`` once
(:func:`~nmsparse.masking.pattern.check_nm`, which also takes an :class:`~nmsparse.masking.pattern.NMPattern`
as ``n``) and passes trusted integers below.

:func:`_masks` picks the path: the numba kernels (:mod:`.kernels`) for CPU tensors, the torch path
(:mod:`.torch_path`) elsewhere, and the 2:4 enumeration (:mod:`.optimal24`) for ``"optimal"`` 2:4
off the CPU. ``_FORCE_TORCH`` and ``_AS_CUDA`` are switches for tests (flip them on this module).
"""

from __future__ import annotations

import torch

from nmsparse.masking.layout import matrices_of, unmatrices
from nmsparse.masking.nm import _BITS, check_nm, is_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.masking.transposable import kernels
from nmsparse.masking.transposable.optimal24 import _optimal_24
from nmsparse.masking.transposable.torch_path import _torch_masks

METHODS = ("optimal", "approx")
_FORCE_TORCH = False  # tests flip this to run the torch path on CPU
_AS_CUDA = False  # tests flip this to run on CPU exactly the route a CUDA tensor takes


def check_method(method: object) -> str:
    """Validate a transposable-mask method name ("optimal" or "approx")."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _check_matrix(w: object, m: int, what: str, batched: bool = False) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{what} needs a torch.Tensor, got {type(w).__name__}")
    want = 3 if batched else 2
    if w.dim() != want:
        raise ValueError(
            f"{what} needs a {want}-D tensor{' (matrices, rows, cols)' if batched else ' (out, in)'}, "
            f"got shape {tuple(w.shape)}" + ("" if batched else "; for a conv weight use transposable_layer_mask")
        )
    rows, cols = w.shape[-2], w.shape[-1]
    if rows % m or cols % m:
        raise ValueError(
            f"{what} needs both matrix sizes to be multiples of m={m} (aligned {m}x{m} tiles), "
            f"got {rows} x {cols}"
        )
    return w


def _check_float(w: torch.Tensor, what: str) -> None:
    if w.dtype not in _BITS:
        raise ValueError(
            f"{what} needs a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got dtype {w.dtype}; convert it first, e.g. w.float()"
        )


def _masks(w: torch.Tensor, n: int, m: int, method: str) -> tuple[torch.Tensor, int, int]:
    """Masks of a (B, R, C) float tensor: (mask, tiles the greedy left short, tiles solved exactly
    after a failed repair); the two counts are 0 for ``"optimal"``."""
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device), 0, 0
    greedy = method == "approx"
    cuda = w.device.type == "cuda" or _AS_CUDA
    if w.device.type == "cpu" and kernels.numba is not None and not _FORCE_TORCH and not cuda:
        return kernels._kernel_masks(w.detach(), n, m, greedy)
    if cuda and not greedy and (n, m) == (2, 4):
        return _optimal_24(w.detach()), 0, 0
    return _torch_masks(w.detach(), n, m, greedy)


def transposable_mask(
    w: torch.Tensor, n: int | NMPattern, m: int | None = None, method: str = "optimal"
) -> torch.Tensor:
    """Transposable N:M keep-mask of a 2-D ``w`` (N kept per group of M): in every aligned
    ``m x m`` tile ``w[i:i+m, j:j+m]`` exactly ``n`` entries of each row and of each column are True,
    so both the mask and its transpose are N:M along their last dimension.

    ``method="optimal"`` keeps the largest possible total ``|w|`` (exact min-cost-flow optimum per
    tile); ``method="approx"`` is the paper's greedy 2-approximation, with tiles the greedy leaves
    under-filled completed by augmenting paths (kept ``|w|`` >= half the optimum on every tile, by a
    per-tile certificate, else an exact solve). See :mod:`nmsparse.masking.transposable`.

    ``w`` may have any float dtype and live on any device; both sizes must be multiples of ``m``.
    Returns a ``torch.bool`` tensor of ``w``'s shape on ``w``'s device. Raises ``ValueError`` for a
    non-2-D or non-float input, sizes that are not multiples of ``m``, a bad ``n``/``m`` or method.
    ``n`` may be an :class:`~nmsparse.masking.pattern.NMPattern` with ``m`` left out, here and in every
    function of this module.
    """
    n, m = check_nm(n, m)
    check_method(method)
    _check_matrix(w, m, "transposable_mask")
    _check_float(w, "transposable_mask")
    return _masks(w.unsqueeze(0), n, m, method)[0][0]


def transposable_stats(w: torch.Tensor, n: int | NMPattern, m: int | None = None, method: str = "approx") -> dict:
    """The mask of :func:`transposable_mask` plus diagnostics, for benchmarks and reports.

    Returns a dict: ``mask``; ``tiles``; ``short``, the tiles the greedy left with a row under ``n``
    (completed by augmenting paths; 0 for ``"optimal"``); ``exact``, the short tiles whose completion
    missed the half-of-upper-bound certificate and were solved exactly; ``kept_abs`` and ``total_abs``,
    the kept and total ``sum |w|`` (float64; non-finite entries make them non-finite).
    """
    n, m = check_nm(n, m)
    check_method(method)
    _check_matrix(w, m, "transposable_stats")
    _check_float(w, "transposable_stats")
    mask, short, exact = _masks(w.unsqueeze(0), n, m, method)
    a = w.detach().abs().double()
    return {
        "mask": mask[0],
        "tiles": (w.shape[0] // m) * (w.shape[1] // m),
        "short": short,
        "exact": exact,
        "kept_abs": float(a[mask[0]].sum()),
        "total_abs": float(a.sum()),
    }


def is_transposable_nm(t: torch.Tensor, n: int | NMPattern, m: int | None = None) -> bool:
    """True when every aligned ``m x m`` tile of the 2-D ``t`` holds at most ``n`` non-zeros in each
    of its rows and each of its columns, i.e. both ``t`` and ``t.T`` pass :func:`nmsparse.is_nm`.
    ``t`` may be a weight or a boolean mask (NaN counts as non-zero)."""
    p = check_nm(n, m)
    _check_matrix(t, p.m, "is_transposable_nm")
    return is_nm(t, p, dim=1) and is_nm(t, p, dim=0)


def transposable_layer_mask(
    weight: torch.Tensor, n: int | NMPattern, m: int | None = None, method: str = "approx", layout: str = "channels"
) -> torch.Tensor:
    """Transposable N:M keep-mask of a Linear or conv weight; same shape as ``weight``.

    Linear ``(out, in)``: the mask of the matrix. Convolutions ``(out, in/groups, *kernel)``: in
    ``layout="channels"`` each kernel position's ``(out, in/groups)`` matrix gets its own transposable
    mask (N:M along input channels for the forward, along output channels for the input gradient); in
    ``layout="flat"`` the ``(out, in/groups * prod(kernel))`` matrix does. ``out`` and the grouped
    axis must be multiples of ``m`` (for grouped convolutions, ``out/groups`` too, so that no tile
    straddles two groups; :func:`nmsparse.masking.layout.unsupported_reason` checks that).
    """
    n, m = check_nm(n, m)
    check_method(method)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"transposable_layer_mask needs a torch.Tensor, got {type(weight).__name__}")
    _check_float(weight, "transposable_layer_mask")
    mats = matrices_of(weight, layout)
    _check_matrix(mats, m, "transposable_layer_mask", batched=True)
    return unmatrices(_masks(mats, n, m, method)[0], weight.shape, layout)


def layer_is_transposable_nm(
    weight: torch.Tensor, n: int | NMPattern, m: int | None = None, layout: str = "channels"
) -> bool:
    """True when every matrix of ``weight`` in ``layout`` (see :func:`transposable_layer_mask`) is
    transposable N:M, i.e. it and its transpose have at most N non-zeros per aligned group of M."""
    p = check_nm(n, m)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"layer_is_transposable_nm needs a torch.Tensor, got {type(weight).__name__}")
    mats = matrices_of(weight, layout)
    _check_matrix(mats, p.m, "layer_is_transposable_nm", batched=True)
    return is_nm(mats, p, dim=2) and is_nm(mats, p, dim=1)

