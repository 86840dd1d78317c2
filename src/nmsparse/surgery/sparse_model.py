"""Module surgery: make a model N:M sparse for training, read its masks, and finalize it."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse.surgery.backends import attach, check_backend, detach
from nmsparse.masking.layout import check_layout, layer_mask, oriented, target_mask
from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.surgery.parametrization import METHODS, NMParametrization, SharedNM
from nmsparse.surgery.selection import KEEP_DENSE, Patterns, SparsityReport, plan
from nmsparse.masking.transposable import METHODS as MASK_METHODS
from nmsparse.masking.transposable import transposable_layer_mask


def check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _check_settings(decay: object, update_every: object) -> tuple[float, int]:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay):
        raise ValueError(f"decay (SR-STE lambda_w) must be a finite number, got {decay!r}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an integer >= 1 (forward passes per mask update), got {update_every!r}")
    return float(decay), update_every


def _pattern(n: int | NMPattern, m: int | None) -> NMPattern:
    """``check_nm`` with ``m`` defaulting to 4 when ``n`` is an integer (``sparsify``'s 2:4 default)."""
    return check_nm(n, 4 if m is None and not isinstance(n, NMPattern) else m)


def mask_function(
    n: int | NMPattern, m: int | None, layout: str, transposable: bool = False, mask_method: str = "approx"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The keep-mask function of a layer weight for these settings (picklable); ``n`` may be an
    :class:`NMPattern` (``m`` None)."""
    p = check_nm(n, m)
    if transposable:
        return functools.partial(transposable_layer_mask, n=p, m=p.m, method=mask_method, layout=layout)
    return functools.partial(layer_mask, n=p, layout=layout)


def _check_transposable(transposable: object, mask_method: object, mask_fn: object) -> None:
    if not isinstance(transposable, bool):
        raise ValueError(f"transposable must be True or False, got {transposable!r}")
    if mask_method not in MASK_METHODS:
        raise ValueError(
            f"mask_method (how transposable masks are found) must be one of {MASK_METHODS}, got {mask_method!r}"
        )
    if transposable and mask_fn is not None:
        raise ValueError("pass either mask_fn or transposable=True, not both: mask_fn replaces the mask rule")


def sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or a submodule (its parameters may be
    unsharded plain tensors for a while: between a forward and its backward, or after a forward with
    ``reshard_after_forward=False``), or some parameter is a DTensor (tensor parallel). Read by class
    names: this never imports ``torch.distributed``."""
    return (any(type(p).__name__ == "DTensor" for p in model.parameters())
            or any(c.__name__ == "FSDPModule" for mod in model.modules() for c in type(mod).__mro__))


def _check_not_sharded(model: nn.Module) -> None:
    if sharded(model):
        raise ValueError("sparsify a model before sharding it (fully_shard / FSDP2 or tensor parallel): "
                         "this model already has DTensor parameters or fully_shard modules")


def _refresh_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: on training-mode passes, let each N:M parametrization update its mask
    (a shared weight's other users refresh the owner's, which acts once per value of the weight)."""
    if not module.training:
        return
    for plist in module.parametrizations.values():
        for p in plist:
            if isinstance(p, NMParametrization):
                p.refresh(plist.original)
            elif isinstance(p, SharedNM):
                p.owner.refresh(plist.original)


def sparsify(
    model: nn.Module,
    n: int | NMPattern = 2,
    m: int | None = None,
    *,
    method: str = "srste",
    decay: float = 2e-4,
    layout: str = "channels",
    update_every: int = 1,
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    transposable: bool = False,
    mask_method: str = "approx",
    shared: str = "dense",
    backend: str = "dense",
) -> SparsityReport:
    """Make ``model`` N:M sparse in place (N weights kept in every group of M) and return a report.

    ``n``, ``m``: 2:4 by default (``m`` is 4 when left out), or an
    :class:`~nmsparse.masking.pattern.NMPattern` as ``n``.

    Each selected layer's dense weight stays the trained parameter; the forward uses ``E * W`` with
    ``E`` recomputed from ``W`` every ``update_every`` training-mode forward passes. ``method`` is
    ``"ste"``, ``"srste"`` (adds ``decay * (~E) * W`` to W's gradient) or ``"fixed"`` (frozen mask,
    pruned weights get no gradient). Groups run along each layer's reduction dimension in ``layout``
    (``"channels"`` or ``"flat"``, see :mod:`nmsparse.masking.layout`). Layers that cannot or should not be
    sparsified are listed in the report with their reason. ``mask_fn`` overrides the mask rule; it
    gets the weight as ``(out, in, ...)`` (transposed for ``transformers``' ``Conv1D``).

    Supported tensors: ``weight`` of Linear, Conv1d/2d/3d and ``transformers``' ``Conv1D``, and
    ``nn.MultiheadAttention.in_proj_weight`` (see :mod:`nmsparse.masking.layout`). ``shared``: a weight that
    several modules hold (tied embeddings) stays dense by default (``"dense"``, the report says
    which module shares it); ``"sparsify"`` makes it N:M consistently for every module that uses it
    (see :mod:`nmsparse.surgery.selection`).

    ``transposable=True`` makes every mask transposable N:M (see :mod:`nmsparse.masking.transposable`): in each
    aligned m x m tile of the layer's ``(out, in)`` matrix (per kernel position for convolutions in
    ``layout="channels"``) every row and column keeps N, so ``E`` and ``E^T`` are both N:M and the
    backward input-gradient matmul can be sparse too. ``mask_method`` is ``"approx"`` (the paper's
    2-approximation, completed) or ``"optimal"``; the paper recomputes every 40 iterations
    (``update_every=40``). Layers whose output channels (per group) are not a multiple of m stay dense,
    with that reason in the report.
    ``backend="semi-structured"`` (2:4 only) runs sparse Linear layers on 2:4 sparse kernels (forward,
    and the input gradient with transposable masks); see :mod:`nmsparse.kernels.semi_training`.
    All arguments are checked before the model is touched.
    """
    pattern = _pattern(n, m)
    n, m = pattern
    check_backend(backend, n, m)
    check_method(method)
    check_layout(layout)
    decay, update_every = _check_settings(decay, update_every)
    _check_transposable(transposable, mask_method, mask_fn)
    _check_not_sharded(model)
    entries = plan(model, pattern, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
                   shared=shared, transposable=transposable)
    modules = dict(model.named_modules())
    fn = mask_fn or mask_function(pattern, None, layout, transposable, mask_method)
    notes: dict[str, str] = {}
    for e in entries:
        if not e.sparse:
            continue
        mod, tname = modules[e.name], e.tensor_name
        p = NMParametrization(
            getattr(mod, tname), n=n, m=m, layout=layout, method=method, decay=decay,
            update_every=update_every, mask_fn=oriented(fn, mod, tname), transposable=transposable,
        )
        parametrize.register_parametrization(mod, tname, p, unsafe=True)
        mod.register_forward_pre_hook(_refresh_hook)
        notes[e.param] = attach(mod, p, backend)
        if e.shared_with:
            p.shared = True
            for full in e.shared_with:
                other_name, _, other_tensor = full.rpartition(".")
                other = modules[other_name]
                parametrize.register_parametrization(other, other_tensor, SharedNM(p), unsafe=True)
                other.register_forward_pre_hook(_refresh_hook)
    settings = dict(method=method, decay=decay, layout=layout, update_every=update_every)
    if transposable:
        settings.update(transposable=True, mask_method=mask_method)
    if shared != "dense":
        settings["shared"] = shared
    if backend != "dense":
        settings.update(backend=backend, backend_layers=notes)
    report = SparsityReport(n, m, entries, settings)
    if not report.sparse:
        warnings.warn(f"sparsify made no layer sparse:\n{report.table()}", stacklevel=2)
    return report


def sparse_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, NMParametrization]]:
    """Yield ``(full tensor name, module, tensor name, parametrization)`` for every N:M sparse tensor
    of ``model``, e.g. ``("layers.0.self_attn.in_proj_weight", mha, "in_proj_weight", p)``; a shared
    weight once, under its owner."""
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for tname, plist in mod.parametrizations.items():
                for p in plist:
                    if isinstance(p, NMParametrization):
                        yield (f"{name}.{tname}" if name else tname), mod, tname, p


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, NMParametrization]]:
    """Yield ``(module name, module, parametrization)`` for every N:M sparse tensor of ``model``
    (see :func:`sparse_tensors` for the tensor's name)."""
    for full, mod, tname, p in sparse_tensors(model):
        yield full[: -len(tname) - 1] if full != tname else "", mod, p


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current keep-masks, keyed by the dense tensor's name in the original model
    (e.g. ``"layer1.0.conv1.weight"``, ``"layers.0.self_attn.in_proj_weight"``). Returns copies:
    later training does not change them. Under FSDP2 with shard-local masks (each rank holds its
    rows, a DTensor) the whole masks are gathered: a collective, call it on every rank."""
    return {full: p.mask.full_tensor() if hasattr(p.mask, "full_tensor") else p.mask.clone()
            for full, _, _, p in sparse_tensors(model)}


def dense_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The trained dense tensor ``module.<name>``, sparsified or not."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def magnitude_masks(
    model: nn.Module,
    n: int | NMPattern = 2,
    m: int | None = None,
    *,
    layout: str = "channels",
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    shared: str = "dense",
) -> dict[str, torch.Tensor]:
    """N:M masks of the current dense weights of the layers :func:`sparsify` would select, without
    modifying ``model`` (for example to track SAD of a densely trained net). ``n``, ``m`` as for
    :func:`sparsify` (2:4 by default, or an :class:`NMPattern` as ``n``)."""
    p = _pattern(n, m)
    if any(True for _ in sparse_tensors(model)):
        return {full: target_mask(dense_weight(mod, t).detach(), mod, t, p, layout=layout)
                for full, mod, t, _ in sparse_tensors(model)}
    entries = plan(model, p, layout=layout, include=include, exclude=exclude, keep_dense=keep_dense,
                   shared=shared)
    modules = dict(model.named_modules())
    return {e.param: target_mask(getattr(modules[e.name], e.tensor_name).detach(), modules[e.name], e.tensor_name,
                                 p, layout=layout)
            for e in entries if e.sparse}


def finalize(model: nn.Module) -> nn.Module:
    """Remove the N:M machinery in place: each sparse tensor (``weight``, ``in_proj_weight``)
    becomes a plain parameter holding ``E * W`` (zeros where pruned; the same ``Parameter`` object as
    the dense weight, so an optimizer holding it stays valid, and a shared weight stays shared). The
    result's ``state_dict`` loads into a fresh copy of the original architecture and gives the same
    outputs as the sparse model. Returns ``model``."""
    todo = []
    for _, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for tname, plist in mod.parametrizations.items():
                if any(isinstance(p, (NMParametrization, SharedNM)) for p in plist):
                    todo.append((mod, tname))
    for mod, tname in todo:
        for key, hook in list(mod._forward_pre_hooks.items()):
            if hook is _refresh_hook:
                del mod._forward_pre_hooks[key]
        detach(mod)
        _remove_parametrization(mod, tname)
    return model


def _remove_parametrization(mod: nn.Module, tname: str) -> None:
    """Like ``parametrize.remove_parametrizations(mod, tname, leave_parametrized=True)``, but
    without deleting the property from the parametrized class: ``copy.deepcopy`` shares that class
    between a model and its copies, so finalizing a copy must not break the original."""
    if set(mod.parametrizations.keys()) != {tname}:  # other tensors parametrized too: the stock path
        with torch.no_grad():
            parametrize.remove_parametrizations(mod, tname, leave_parametrized=True)
        return
    with torch.no_grad():
        value = getattr(mod, tname)
        original = mod.parametrizations[tname].original
        original.set_(value.detach().clone())
    delattr(mod, "parametrizations")
    mod.__class__ = type(mod).__bases__[0]  # the class parametrize derived this module's class from
    mod.register_parameter(tname, original)
