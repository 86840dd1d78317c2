"""Where a layer's N:M groups run: along its reduction dimension.

A sparsifiable tensor is a ``(module, parameter name)`` pair (a *target*):

* ``nn.Linear`` ``weight`` ``(out, in)``: groups along ``in`` (dim 1).
* Convolutions, ``weight`` ``(out, in/groups, *kernel)``:
  ``layout="channels"`` (default) groups along input channels at each kernel position, the layout
  sparse tensor-core kernels (and NVIDIA's ASP) use; ``layout="flat"`` groups along the flattened
  ``in/groups * prod(kernel)`` axis, as the original SR-STE code did. Grouped and depthwise
  convolutions group within each group's channels, since dim 1 of their weight already holds them.
* ``transformers``' ``Conv1D`` (GPT-2) ``weight`` ``(in, out)``, ``y = x @ W + b``: groups along
  ``in`` (dim 0). Its ``(out, in)`` matrix is ``weight.T``.
* ``nn.MultiheadAttention`` ``in_proj_weight`` ``(3E, E)`` (query, key and value projections stacked
  by rows): groups along ``E`` (dim 1). Separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` differ from
  ``embed_dim``) are not supported.

:func:`reduction_dim` and :func:`as_matrix` are the one place that knows these layouts; everything
else (masks, checks, pruning geometry, exporters) asks them.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import torch
from torch import nn

from nmsparse.masking.nm import check_nm, is_nm, nm_mask
from nmsparse.masking.pattern import NMPattern

LAYOUTS = ("channels", "flat")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose ``weight`` is (out, in, ...)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = "only Linear, Conv1d/2d/3d, transformers' Conv1D and MultiheadAttention.in_proj_weight"
KINDS = ("linear", "conv", "transposed", "in_proj")


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


def layer_mask(weight: torch.Tensor, n: int | NMPattern, m: int | None = None, layout: str = "channels") -> torch.Tensor:
    """N:M keep-mask (N kept per M; ``n`` may be an :class:`NMPattern`) of a Linear/Conv weight in
    ``layout``; same shape as ``weight``."""
    return nm_mask(grouped(weight, layout), check_nm(n, m), dim=1).view(weight.shape)


def layer_is_nm(weight: torch.Tensor, n: int | NMPattern, m: int | None = None, layout: str = "channels") -> bool:
    """True when ``weight`` has at most N non-zeros in every group of M of ``layout`` (``n`` may be
    an :class:`NMPattern`)."""
    return is_nm(grouped(weight, layout), check_nm(n, m), dim=1)


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


def hf_conv1d_classes() -> tuple[type, ...]:
    """``transformers``' ``Conv1D`` class(es), when ``transformers`` is already imported (a model that
    holds one has imported it); never imports ``transformers`` itself."""
    out: list[type] = []
    for modname in ("transformers.pytorch_utils", "transformers.modeling_utils"):
        cls = getattr(sys.modules.get(modname), "Conv1D", None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in out:
            out.append(cls)
    return tuple(out)


def target_kind(module: nn.Module, name: str = "weight") -> str | None:
    """Which kind of sparsifiable tensor ``module.<name>`` is, or None when it is not one.

    ``"linear"`` (``nn.Linear.weight``), ``"conv"`` (``nn.Conv1d/2d/3d.weight``), ``"transposed"``
    (``transformers``' ``Conv1D.weight``, stored ``(in, out)``), ``"in_proj"``
    (``nn.MultiheadAttention.in_proj_weight``, present when ``kdim == vdim == embed_dim``).
    """
    if name == "weight":
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, CONVS):
            return "conv"
        classes = hf_conv1d_classes()
        if classes and isinstance(module, classes):
            return "transposed"
        return None
    if name == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
        return "in_proj" if module._qkv_same_embed_dim else None
    return None


def target_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own tensors that can be made N:M (see :func:`target_kind`)."""
    return [n for n in ("weight", "in_proj_weight") if target_kind(module, n) is not None]


def _kind(module: nn.Module, name: str) -> str:
    kind = target_kind(module, name)
    if kind is None:
        raise ValueError(
            f"{type(module).__name__}.{name} is not a tensor nmsparse can make N:M ({SUPPORTED}); "
            "see docs/layers.md"
        )
    return kind


def reduction_dim(module: nn.Module, name: str = "weight") -> int:
    """The dimension of ``module.<name>`` that N:M groups run along (its reduction dimension).

    1 for ``nn.Linear`` ``(out, in)``, convolutions ``(out, in/groups, *kernel)`` (in
    ``layout="channels"``; ``"flat"`` flattens dims 1.. first) and ``nn.MultiheadAttention``'s
    ``in_proj_weight`` ``(3E, E)``; 0 for ``transformers``' ``Conv1D`` ``(in, out)``. Raises
    ValueError for anything else. Use :func:`as_matrix` for the ``(out, reduction)`` view.
    """
    return 0 if _kind(module, name) == "transposed" else 1


def as_matrix(tensor: torch.Tensor, module: nn.Module, name: str = "weight", layout: str = "channels") -> torch.Tensor:
    """``tensor`` (``module.<name>`` or a mask of its shape) as a view whose dim 0 is the output axis
    and dim 1 the axis the N:M groups run along: ``(out, in)`` for Linear, ``MultiheadAttention``'s
    ``in_proj_weight`` and ``transformers``' ``Conv1D`` (``weight.T``); for convolutions the tensor
    itself in ``layout="channels"`` (``(out, in/groups, *kernel)``) or ``(out, in/groups * prod(kernel))``
    in ``"flat"``. N:M groups are M consecutive entries along dim 1 (at each kernel position)."""
    kind = _kind(module, name)
    if kind == "transposed":
        return tensor.t()
    return grouped(tensor, layout)


def _transposed(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return fn(tensor.t()).t().contiguous()


def oriented(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, name: str = "weight") -> Callable:
    """A mask function ``fn`` written for ``(out, in, ...)`` weights, adapted to ``module.<name>``'s
    storage (transposed for ``transformers``' ``Conv1D``). Picklable when ``fn`` is."""
    if _kind(module, name) == "transposed":
        return functools.partial(_transposed, fn=fn)
    return fn


def target_mask(tensor: torch.Tensor, module: nn.Module, name: str, n: int | NMPattern, m: int | None = None,
                layout: str = "channels") -> torch.Tensor:
    """N:M keep-mask (N kept per M along :func:`reduction_dim`; ``n`` may be an :class:`NMPattern`) of
    ``tensor``, stored like ``module.<name>``."""
    return oriented(functools.partial(layer_mask, n=check_nm(n, m), layout=layout), module, name)(tensor)


def target_is_nm(tensor: torch.Tensor, module: nn.Module, name: str, n: int | NMPattern, m: int | None = None,
                 layout: str = "channels") -> bool:
    """True when ``tensor`` (stored like ``module.<name>``) is N:M along its reduction dimension (``n``
    may be an :class:`NMPattern`)."""
    return is_nm(as_matrix(tensor, module, name, layout), check_nm(n, m), dim=1)


def out_per_group(module: nn.Module, name: str = "weight") -> int:
    """Output rows of one independent ``(out, reduction)`` problem: ``out / groups`` for grouped
    convolutions, ``E`` for each of the query/key/value blocks of ``in_proj_weight``, else ``out``."""
    kind = _kind(module, name)
    t = getattr(module, name)
    if kind == "transposed":
        return t.shape[1]
    if kind == "in_proj":
        return t.shape[0] // 3
    return t.shape[0] // (module.groups if kind == "conv" else 1)


def unsupported_reason(
    module: nn.Module, n: int | NMPattern, m: int | None = None, layout: str = "channels", transposable: bool = False,
    name: str = "weight",
) -> str | None:
    """Why ``module.<name>`` cannot be made N:M in ``layout`` (``n`` may be an :class:`NMPattern`), or
    None when it can.

    With ``transposable=True`` the output channels (per group, for grouped convolutions) must also
    be a multiple of m, so that the aligned m x m tiles of :func:`matrices_of` exist and none
    straddles two groups.
    """
    n, m = check_nm(n, m)
    kind = target_kind(module, name)
    if kind is None:
        return f"{type(module).__name__} is not supported ({SUPPORTED})"
    size = as_matrix(getattr(module, name), module, name, layout).shape[1]
    if size % m:
        axis = f"{layout} reduction axis" if kind == "conv" else "input features"
        return f"{axis} size {size} is not a multiple of m={m}"
    if transposable:
        out = out_per_group(module, name)
        if out % m:
            groups = getattr(module, "groups", 1) if kind == "conv" else 1
            if kind != "conv":
                axis = "output features"
            else:
                axis = "output channels per group" if groups > 1 else "output channels"
            return f"{axis} {out} is not a multiple of m={m} (a transposable mask needs both)"
    return None
