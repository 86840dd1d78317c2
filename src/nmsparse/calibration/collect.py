"""Calibration statistics, streamed layer by layer through the already-pruned model.

For each layer (or set of layers that read the very same input tensor, such as a transformer's
query/key/value projections) the calibration batches are run through the model as it is *now*, with
every earlier layer already pruned; a forward pre-hook turns the layer's input into feature rows (see
:mod:`nmsparse.calibration.geometry`) and accumulates the Gram matrix ``H = sum x x^T`` (with a column of
ones appended when the layer has a bias). The forward pass is cut short right after the hook, so
each pass only runs the model up to the layer. Nothing but ``H`` (and, for AdaPrune's Adam solver,
one ``H`` per mini-batch of samples) is kept: activations are never held for more than one batch.
Methods that need no more than the feature norms (Wanda, magnitude) accumulate those instead of ``H``,
plus a bounded sample of rows for the report's errors (:class:`Gram` with ``full=False``).
Layers of one set that also turn the input into the same feature rows (:func:`share_key`: e.g. q/k/v
of equal width, an MLP's gate and up projections) share one Gram matrix, accumulated once: found from
the data flow (the input tensor object each layer's hook sees), the same bits as one Gram per layer.

A calibration item is an input batch, or a ``(inputs, targets)`` pair / list whose first element is
the input. Inputs are a tensor (``model(x)``) or a mapping of keyword arguments (``model(**batch)``,
as a Hugging Face tokenizer returns). When the mapping has an ``attention_mask`` of shape
``(batch, tokens)``, padded tokens are left out of the statistics of every Linear layer whose input
is ``(batch, tokens, features)``.

``nn.MultiheadAttention`` (its ``in_proj_weight``) reads three inputs, ``query``, ``key`` and
``value``; each of its query/key/value projections gets the Gram matrix of its own input (inputs
are taken batch-first). PyTorch's fused attention fast path, which skips the module's hooks in
inference, is switched off during calibration passes. Its ``out_proj`` Linear is never called as a
module (the attention reads its weight): its input is taken by running the attention once more with
an identity ``out_proj``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from nmsparse.calibration.geometry import LayerGeometry
from nmsparse.calibration.gram import Gram

# Feature rows x columns computed at once; bounds im2col memory (float32: 64 MiB).
CHUNK_ELEMS = 1 << 24


class LayerCollector:
    """Feeds one layer's inputs, batch by batch, into one :class:`Gram` per problem (``full``: see
    :class:`Gram`)."""

    def __init__(self, geom: LayerGeometry, device: torch.device, bin_size: int | None = None,
                 full: bool = True) -> None:
        self.geom = geom
        self.grams = [Gram(geom.d, geom.has_bias, device, bin_size, full) for _ in range(geom.problems)]
        self.bin_size = bin_size
        self.samples = 0

    def _batched(self, x: torch.Tensor | tuple) -> list[torch.Tensor]:
        geom = self.geom
        xs = list(x) if isinstance(x, (tuple, list)) else [x]
        out: list[torch.Tensor] = []
        for i, t in enumerate(xs):
            if i and t is xs[i - 1]:
                out.append(out[-1])
                continue
            t = t.detach()
            if not geom.is_conv and t.dim() == 1:
                t = t.unsqueeze(0)
            if geom.is_conv and t.dim() == len(geom.module.kernel_size) + 1:
                t = t.unsqueeze(0)
            if geom.kind == "in_proj":
                if t.dim() == 2:  # unbatched (L, E)
                    t = t.unsqueeze(0)
                elif not geom.module.batch_first:  # (L, N, E) -> (N, L, E)
                    t = t.transpose(0, 1)
            out.append(t)
        return out

    @torch.no_grad()
    def add(self, x: torch.Tensor | tuple, token_mask: torch.Tensor | None = None) -> None:
        """Add one batch of the layer's input (for ``in_proj_weight``: ``(query, key, value)``)."""
        geom = self.geom
        xs = self._batched(x)
        b = xs[0].shape[0]
        per_sample = max(1, max(t[0].numel() for t in xs) * geom.k)
        chunk = max(1, CHUNK_ELEMS // per_sample)
        start = 0
        while start < b:
            s = self.samples + start
            if self.bin_size:
                end, bin_index = min(b, start + self.bin_size - s % self.bin_size), s // self.bin_size
            else:
                end, bin_index = b, None
            for c0 in range(start, end, chunk):
                c1 = min(end, c0 + chunk)
                feats: list[torch.Tensor] = []
                for i, t in enumerate(xs):
                    if i and t is xs[i - 1]:
                        feats.append(feats[-1])
                        continue
                    part = t[c0:c1]
                    if (token_mask is not None and not geom.is_conv and t.dim() >= 3
                            and tuple(token_mask.shape) == tuple(t.shape[:2])):
                        part = part[token_mask[c0:c1].to(device=part.device, dtype=torch.bool)]
                    feats.append(geom.features(part))
                for g, gram in enumerate(self.grams):
                    gram.add(geom.problem_features(feats[g if geom.inputs > 1 else 0], g), bin_index)
            start = end
        self.samples += b


class _Stop(Exception):
    """Raised by a hook to end a calibration forward pass early."""


def _inputs(item: Any) -> Any:
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("a calibration item is an empty tuple/list; expected inputs or (inputs, targets)")
        return item[0]
    return item


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs


def _token_mask(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, Mapping):
        am = inputs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            return am
    return None


def _call(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    else:
        model(inputs)


def prepare(calib: Iterable | None) -> list | Iterable | None:
    """A calibration set that can be iterated many times (a one-shot iterator becomes a list of its
    inputs), or None when ``calib`` is None or empty."""
    if calib is None:
        return None
    if iter(calib) is calib:  # a generator or iterator: read it once
        calib = [_inputs(item) for item in calib]
    for _ in calib:
        return calib
    return None


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    return next(iter(kwargs.values()))


def layer_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | tuple:
    """A layer's input from a forward pre-hook's arguments: ``(query, key, value)`` for
    ``nn.MultiheadAttention``, else its first argument."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("query", "key", "value")
        given = list(args[:3])
        return tuple(given + [kwargs[k] for k in names[len(given):]])
    return _input_of(args, kwargs)


@contextlib.contextmanager
def no_attention_fastpath() -> Iterator[None]:
    """Switch off PyTorch's fused attention fast path (``nn.MultiheadAttention`` and
    ``nn.TransformerEncoder(Layer)`` in inference), which skips the hooks of the modules inside."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - older torch
        yield
        return
    old = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(old)


def _out_proj_input(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of ``mha.out_proj`` for this call: ``mha`` run again with an identity ``out_proj``
    (``nn.MultiheadAttention`` reads ``out_proj``'s weight and never calls the Linear itself)."""
    params = mha.out_proj._parameters
    saved = dict(params)
    w = params["weight"]
    try:
        params["weight"] = nn.Parameter(torch.eye(w.shape[1], dtype=w.dtype, device=w.device), requires_grad=False)
        if saved.get("bias") is not None:
            params["bias"] = nn.Parameter(torch.zeros_like(saved["bias"]), requires_grad=False)
        if len(args) <= 4:
            kwargs = dict(kwargs, need_weights=False)
        return mha.forward(*args, **kwargs)[0]
    finally:
        params.update(saved)


def _on_input(model_modules: dict[str, nn.Module], name: str, fn: Callable[[Any], None]):
    """Hook that calls ``fn(layer input)`` whenever the layer ``name`` runs; for an
    ``nn.MultiheadAttention``'s ``out_proj`` (never called as a module) after its parent runs."""
    mod = model_modules[name]
    parent = model_modules.get(name.rpartition(".")[0]) if name else None
    if isinstance(parent, nn.MultiheadAttention) and parent.out_proj is mod:
        def post(p, args, kwargs, output):
            fn(_out_proj_input(p, args, kwargs))
        return parent.register_forward_hook(post, with_kwargs=True)

    def pre(m, args, kwargs):
        fn(layer_input(m, args, kwargs))
    return mod.register_forward_pre_hook(pre, with_kwargs=True)


def forward_order(model: nn.Module, modules: dict[str, nn.Module], calib: Iterable) -> list[list[str]]:
    """Names of ``modules`` in the order a forward pass on the first calibration batch calls them,
    grouped so that consecutive layers reading the very same input tensor form one group. Modules
    that the pass does not call are left out."""
    device = _device(model)
    order: list[str] = []
    seen_inputs: list[Any] = []
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(x):
            if name not in order:
                order.append(name)
                seen_inputs.append(x[0] if isinstance(x, tuple) else x)
        return hook

    everything = dict(model.named_modules())
    for name in modules:
        handles.append(_on_input(everything, name, hook_for(name)))
    try:
        first = _inputs(next(iter(calib)))
        with torch.no_grad(), no_attention_fastpath():
            _call(model, _to(first, device))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for i, name in enumerate(order):
        if i and seen_inputs[i] is seen_inputs[i - 1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def share_key(geom: LayerGeometry) -> tuple | None:
    """Layers with equal keys turn the same input into the same feature rows, hence the same Gram
    matrices (bit for bit: same code, same chunks). Linear and ``Conv1D`` layers:
    input width and bias; convolutions: also every hyper-parameter of the unfolding and the layout."""
    mod = geom.module
    conv = None
    if geom.is_conv:
        pad = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
        conv = (type(mod).__name__, tuple(mod.kernel_size), tuple(mod.stride), pad, tuple(mod.dilation),
                mod.groups, mod.padding_mode, geom.layout)
    mha = bool(mod.batch_first) if geom.kind == "in_proj" else None
    kind = "rows" if geom.kind in ("linear", "transposed") else geom.kind
    return (kind, geom.d, geom.problems, geom.has_bias, conv, mha)


class ShareMismatch(Exception):
    """Raised by :func:`collect` (``share=True``) when layers that read the very same input tensor on the
    first calibration batch do not on a later one (data-dependent routing): collect again unshared."""


def _same_input(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(x is y for x, y in zip(a, b)))
    return a is b


def collect(
    model: nn.Module,
    collectors: dict[str, LayerCollector],
    calib: Iterable,
    *,
    share: bool = False,
) -> None:
    """Run every calibration batch through ``model`` (as it is now) and feed each named layer's input
    to its collector; each pass stops as soon as all of them have seen the batch.

    ``share``: a layer that, on the first batch, reads the very same input tensor object as a layer
    that ran before it in the pass, with an equal :func:`share_key`, accumulates nothing of its own:
    its entry of ``collectors`` is replaced (in place) by that layer's collector, so one Gram matrix
    serves both (a transformer's query/key/value projections, an MLP's gate and up projections).
    Sharing is found from the data flow alone, whatever the architecture; every later batch is
    checked to flow the same way, else :class:`ShareMismatch` is raised (the collectors are then
    spoilt: make new ones and collect again without sharing)."""
    device = _device(model)
    modules = dict(model.named_modules())
    state: dict[str, Any] = {"fired": set(), "mask": None, "fed": [], "batch": 0}
    leader: dict[str, str] = {}  # follower name -> the layer whose collector it shares
    keys = {name: share_key(c.geom) for name, c in collectors.items()} if share else {}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(x):
            if name in state["fired"]:
                return
            state["fired"].add(name)
            key = keys.get(name)
            lead = None
            if key is not None:
                lead = next((other for other, k, seen in state["fed"] if k == key and _same_input(seen, x)), None)
                if state["batch"] == 0:
                    if lead is not None:
                        leader[name] = lead
                elif lead != leader.get(name):
                    raise ShareMismatch(f"layer {name} shares its input with {lead} on batch {state['batch']} "
                                        f"but with {leader.get(name)} on the first batch")
            if lead is None:
                collectors[name].add(x, state["mask"])
                if key is not None:
                    state["fed"].append((name, key, x))
            if len(state["fired"]) == len(collectors):
                raise _Stop
        return hook

    for name in collectors:
        handles.append(_on_input(modules, name, hook_for(name)))
    try:
        with torch.no_grad(), no_attention_fastpath():
            for item in calib:
                inputs = _to(_inputs(item), device)
                state["fired"], state["mask"], state["fed"] = set(), _token_mask(inputs), []
                try:
                    _call(model, inputs)
                except _Stop:
                    pass
                state["batch"] += 1
    finally:
        for h in handles:
            h.remove()
        state["fed"] = []
    for name, lead in leader.items():
        collectors[name] = collectors[lead]
