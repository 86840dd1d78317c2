"""Where a layer's N:M groups run: along its reduction dimension.

* ``nn.Linear`` weight ``(out, in)``: groups along ``in``.
* Convolutions, weight ``(out, in/groups, *kernel)``:
  ``layout="channels"`` (default) groups along input channels at each kernel position, the layout
  sparse tensor-core kernels (and NVIDIA's ASP) use; ``layout="flat"`` groups along the flattened
  ``in/groups * prod(kernel)`` axis, as the original SR-STE code did. Grouped and depthwise
  convolutions group within each group's channels, since dim 1 of their weight already holds them.
"""

from __future__ import annotations

import torch
from torch import nn

from nmsparse.nmmasks import check_nm, is_nm, nm_mask

LAYOUTS = ("channels", "flat")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_layout(layout: object) -> str:
    """Validate a layout name ("channels" or "flat")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def grouped(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """View of ``weight`` whose dim 1 is the axis the N:M groups run along."""
    check_layout(layout)
    if weight.dim() < 2:
        raise ValueError(f"a layer weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1) if layout == "flat" else weight


def reduction_size(weight: torch.Tensor, layout: str) -> int:
    """Length of the axis the groups run along (must be a multiple of m)."""
    return grouped(weight, layout).shape[1]


def layer_mask(weight: torch.Tensor, n: int, m: int, layout: str = "channels") -> torch.Tensor:
    """N:M keep-mask (N kept per M) of a Linear/Conv weight in ``layout``; same shape as ``weight``."""
    return nm_mask(grouped(weight, layout), n, m, dim=1).view(weight.shape)


def layer_is_nm(weight: torch.Tensor, n: int, m: int, layout: str = "channels") -> bool:
    """True when ``weight`` has at most N non-zeros in every group of M of ``layout``."""
    return is_nm(grouped(weight, layout), n, m, dim=1)


def matrices_of(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``(out, reduction)`` matrices of a layer weight, stacked as ``(K, out, reduction)``.

    Linear: ``K = 1``. Convolutions in ``"channels"``: one ``(out, in/groups)`` matrix per kernel
    position (``K = prod(kernel)``); in ``"flat"``: the single ``(out, in/groups * prod(kernel))``
    matrix. Transposable masks constrain every aligned m x m tile of each of these matrices.
    """
    g = grouped(weight, layout)
    return g.reshape(g.shape[0], g.shape[1], -1).permute(2, 0, 1)


def unmatrices(mats: torch.Tensor, shape: torch.Size, layout: str) -> torch.Tensor:
    """Inverse of :func:`matrices_of`: a ``(K, out, reduction)`` tensor back to the weight's ``shape``."""
    check_layout(layout)
    return mats.permute(1, 2, 0).reshape(shape)


def unsupported_reason(module: nn.Module, n: int, m: int, layout: str, transposable: bool = False) -> str | None:
    """Why ``module``'s weight cannot be made N:M in ``layout``, or None when it can.

    With ``transposable=True`` the output channels (per group, for grouped convolutions) must also
    be a multiple of m, so that the aligned m x m tiles of :func:`matrices_of` exist and none
    straddles two groups.
    """
    check_nm(n, m)
    if not isinstance(module, SUPPORTED_LAYERS):
        return f"{type(module).__name__} is not supported (only Linear and Conv1d/2d/3d)"
    size = reduction_size(module.weight, layout)
    if size % m:
        axis = "input features" if isinstance(module, nn.Linear) else f"{layout} reduction axis"
        return f"{axis} size {size} is not a multiple of m={m}"
    if transposable:
        groups = getattr(module, "groups", 1)
        out = module.weight.shape[0] // groups
        if out % m:
            if isinstance(module, nn.Linear):
                axis = "output features"
            else:
                axis = "output channels per group" if groups > 1 else "output channels"
            return f"{axis} {out} is not a multiple of m={m} (a transposable mask needs both)"
    return None
