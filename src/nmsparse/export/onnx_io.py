"""The inputs and outputs of an exported ONNX graph: their names and dynamic axes (pure: nothing is written).

Defaults chosen by :func:`graph_inputs` and :func:`output_names`:

* inputs take the names of ``model.forward``'s parameters (``input_ids``, ``attention_mask``,
  ``token_type_ids`` for a transformers model); a model other than a transformers one that takes a
  single tensor gets ``input``;
* outputs take their keys in the model's output (a transformers ``ModelOutput``: ``last_hidden_state``,
  ``pooler_output``, ``logits``...); a single tensor output is ``logits`` (a classifier's); the items of
  a tuple are ``output_0``, ``output_1``...;
* dynamic axes (``dynamic=True``): axis 0 of every input is ``batch``; axis 1 of the token inputs of
  :data:`TOKEN_INPUTS` is ``sequence``. ``dynamic=False`` fixes every shape to the example's; a dict
  ``{input name: {axis: axis name}}`` names the dynamic axes itself (one name = one size).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections.abc import Mapping

import torch
from torch import nn

BATCH, SEQUENCE = "batch", "sequence"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass
class GraphInputs:
    """The example tensors of one forward pass, flattened in the order the exporter makes graph inputs.

    ``names[i]`` is the ONNX name of ``tensors[i]``; ``axes[i]`` its dynamic axes ``{axis: name}``.
    """

    signature: inspect.Signature
    arguments: dict  # forward parameter -> example value (a tensor, or a tuple/dict for *args/**kwargs)
    names: list[str]
    tensors: list[torch.Tensor]
    axes: list[dict[int, str]]

    def call(self, tensors: list[torch.Tensor] | None = None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for ``model(*args, **kwargs)``, with ``tensors`` in place of the example's."""
        bound = inspect.BoundArguments(self.signature, self._per_argument(self.tensors if tensors is None else tensors))
        return tuple(bound.args), dict(bound.kwargs)

    def dynamic_shapes(self) -> dict | None:
        """``torch.export``'s ``dynamic_shapes`` (keyed by forward parameter), None when nothing is dynamic."""
        if not any(self.axes):
            return None
        dims = {name: torch.export.Dim(name) for ax in self.axes for name in ax.values()}
        return self._per_argument([{a: dims[n] for a, n in ax.items()} or None for ax in self.axes])

    def _per_argument(self, items: list) -> dict:
        """``items`` (one per example tensor, in order) laid out as the forward arguments hold the
        tensors: a tuple for ``*args``, a dict for ``**kwargs``, else one item per parameter."""
        it = iter(items)
        out = {}
        for k, v in self.arguments.items():
            kind = self.signature.parameters[k].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                out[k] = tuple(next(it) for _ in v)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                out[k] = {kk: next(it) for kk in v}
            else:
                out[k] = next(it)
        return out

    def widened(self) -> list[torch.Tensor]:
        """The example tensors with every dynamic axis of size 1 repeated to size 2, for tracing:
        ``torch.export`` specializes an axis whose example size is 1, which would fix it in the file."""
        out = []
        for t, ax in zip(self.tensors, self.axes):
            for a in ax:
                if t.shape[a] == 1:
                    t = torch.cat([t, t], dim=a)
            out.append(t)
        return out

    def sizes(self) -> dict[str, int]:
        """Each dynamic axis name -> its size in the example."""
        return {n: int(t.shape[a]) for t, ax in zip(self.tensors, self.axes) for a, n in ax.items()}

    def resized(self, sizes: Mapping[str, int]) -> list[torch.Tensor]:
        """The example tensors with each dynamic axis cut to (or tiled up to) ``sizes[name]``."""
        out = []
        for t, ax in zip(self.tensors, self.axes):
            for a, n in ax.items():
                if n in sizes and sizes[n] != t.shape[a]:
                    reps = [1] * t.dim()
                    reps[a] = -(-sizes[n] // t.shape[a])
                    t = t.repeat(*reps).narrow(a, 0, sizes[n])
            out.append(t)
        return out


def _is_transformers(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, getattr(tf, "PreTrainedModel", ()))


def graph_inputs(model: nn.Module, args: tuple, kwargs: dict, input_names: list[str] | None = None,
                 dynamic: bool | Mapping = True) -> GraphInputs:
    """Bind the example ``args``/``kwargs`` to ``model.forward`` and name the graph inputs and their
    dynamic axes (see the module doc). Raises ``ValueError`` naming the problem."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from None
    names, tensors = [], []
    for k, v in bound.arguments.items():
        kind = sig.parameters[k].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            items = [(f"{k}_{i}", t) for i, t in enumerate(v)]
        elif kind is inspect.Parameter.VAR_KEYWORD:
            items = list(v.items())
        else:
            items = [(k, v)]
        for name, t in items:
            names.append(name)
            tensors.append(t)
    if len(tensors) == 1 and not _is_transformers(model):
        names = ["input"]
    if input_names is not None:
        if (not isinstance(input_names, (list, tuple)) or len(input_names) != len(tensors)
                or not all(isinstance(v, str) and v for v in input_names)):
            raise ValueError(f"input_names must be a list of {len(tensors)} non-empty strings (one per example "
                             f"tensor, in the order {names}), got {input_names!r}")
        names = list(input_names)
    _check_unique("input_names", names)
    axes = _axes(names, tensors, dynamic)
    _check_sizes(names, tensors, axes)
    return GraphInputs(sig, dict(bound.arguments), names, tensors, axes)


def _check_unique(what: str, names: list[str]) -> None:
    dup = sorted({v for v in names if names.count(v) > 1})
    if dup:
        raise ValueError(f"{what} must be unique, {dup[0]!r} appears {names.count(dup[0])} times")


def _axes(names: list[str], tensors: list[torch.Tensor], dynamic: bool | Mapping) -> list[dict[int, str]]:
    if dynamic is True:
        return [({0: BATCH} if t.dim() >= 1 else {}) | ({1: SEQUENCE} if n in TOKEN_INPUTS and t.dim() >= 2 else {})
                for n, t in zip(names, tensors)]
    if dynamic is False:
        return [{} for _ in names]
    if not isinstance(dynamic, Mapping):
        raise ValueError(f"dynamic must be True, False or a dict {{input name: {{axis: axis name}}}}, got {dynamic!r}")
    unknown = [k for k in dynamic if k not in names]
    if unknown:
        raise ValueError(f"dynamic names input {unknown[0]!r}, which the graph does not have; its inputs are {names}")
    out = []
    for n, t in zip(names, tensors):
        spec = dynamic.get(n) or {}
        if not isinstance(spec, Mapping):
            raise ValueError(f"dynamic[{n!r}] must be a dict {{axis: axis name}}, e.g. {{0: 'batch'}}, got {spec!r}")
        ax = {}
        for a, name in spec.items():
            if isinstance(a, bool) or not isinstance(a, int) or not -t.dim() <= a < t.dim():
                raise ValueError(f"dynamic[{n!r}]: axis {a!r} is not an axis of the {t.dim()}-D example input "
                                 f"of shape {tuple(t.shape)}")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"dynamic[{n!r}][{a}]: axis names must be identifiers like 'batch', got {name!r}")
            ax[a % t.dim()] = name
        out.append(ax)
    return out


def _check_sizes(names: list[str], tensors: list[torch.Tensor], axes: list[dict[int, str]]) -> None:
    sizes: dict[str, tuple[str, int]] = {}
    for n, t, ax in zip(names, tensors, axes):
        for a, name in ax.items():
            seen = sizes.setdefault(name, (n, int(t.shape[a])))
            if seen[1] != t.shape[a]:
                raise ValueError(f"dynamic axis {name!r} has size {seen[1]} in input {seen[0]!r} but {t.shape[a]} in "
                                 f"{n!r}: one name is one size; pass dynamic={{input: {{axis: name}}}} with different "
                                 "names, or dynamic=False")


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def output_names(output: object, given: list[str] | None = None) -> list[str]:
    """Names of the tensor leaves of ``output`` (a model's return value), in pytree order (see the module doc);
    ``given`` overrides them and must hold one name per tensor."""
    from torch.utils._pytree import SequenceKey, tree_flatten_with_path

    leaves = [(path, v) for path, v in tree_flatten_with_path(output)[0] if isinstance(v, torch.Tensor)]
    if given is not None:
        if (not isinstance(given, (list, tuple)) or len(given) != len(leaves)
                or not all(isinstance(v, str) and v for v in given)):
            raise ValueError(f"output_names must be a list of {len(leaves)} non-empty strings (one per output "
                             f"tensor of the model), got {given!r}")
        names = list(given)
    elif len(leaves) == 1 and not leaves[0][0]:
        names = ["logits"]
    else:
        names = []
        for path, _ in leaves:
            parts = [_key(k) for k in path]
            if path and isinstance(path[0], SequenceKey):
                parts[0] = f"output_{parts[0]}"
            names.append(re.sub(r"[^A-Za-z0-9_.]", "_", ".".join(parts)) or "output")
    _check_unique("output_names", names)
    return names
