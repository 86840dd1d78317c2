"""``torch.export`` front end of the channel-space walk, for models ``torch.fx.symbolic_trace`` cannot
trace (Hugging Face transformers 5 models: data-dependent Python control flow, no ``utils.fx``).

``torch.export.export(..., strict=False)`` runs the model once on the example inputs and records an
ATen graph whose parameters are graph inputs named by the export signature
(``inputs_to_parameters``: placeholder -> ``encoder.layer.0.output.dense.weight``). This module
rewrites that graph into the vocabulary :class:`nmsparse.permute.graph.Walker` already reads:

* ``aten.linear`` / ``conv*`` / ``embedding`` / ``layer_norm`` / ``batch_norm`` whose weight is the
  ``weight`` parameter of an ``nn.Linear`` / ``nn.Conv*`` / ``nn.Embedding`` / ``nn.LayerNorm`` /
  ``nn.BatchNorm*`` become ``call_module`` nodes of that module (the module is found from the
  parameter's name, so the mapping does not depend on ``nn_module_stack`` metadata);
* parameter and buffer inputs become ``get_attr`` nodes of their fully qualified names (an
  elementwise op with a per-channel parameter permutes that parameter);
* elementwise ops, dropout, casts, ``add/sub/mul/div``, ``transpose``, ``permute``, ``flatten``,
  reductions, pooling, ``select`` / ``slice`` / ``unsqueeze`` / ``squeeze`` map to the torch
  functions the walker follows;
* every other op (``view`` / ``reshape``: the attention head split and merge, ``cat``, matmul,
  ``scaled_dot_product_attention``, a functional ``linear`` on a weight no module owns, ...) is
  kept with its ATen name, so the walker stops there and names it in the report.

Shapes come from the export's example values (``node.meta["val"]``). Nothing here modifies the model.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


class _Meta(NamedTuple):
    shape: tuple[int, ...]


def _packets(*names: str) -> set:
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


# module-backed ops: packet -> (module types, index of the weight arg, index of the tracked input)
MODULE_OPS = {
    aten.linear: (nn.Linear, 1, 0),
    aten.conv1d: ((nn.Conv1d,), 1, 0),
    aten.conv2d: ((nn.Conv2d,), 1, 0),
    aten.conv3d: ((nn.Conv3d,), 1, 0),
    aten.convolution: ((nn.Conv1d, nn.Conv2d, nn.Conv3d), 1, 0),
    aten.embedding: (nn.Embedding, 0, 1),
    aten.layer_norm: (nn.LayerNorm, 2, 0),
    aten.batch_norm: ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), 1, 0),
    aten._native_batch_norm_legit_no_training: ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), 1, 0),
}
ELEMENTWISE = _packets("relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid",
                       "leaky_relu", "elu", "mish", "softplus", "relu6", "erf", "exp", "abs", "neg", "sqrt", "rsqrt",
                       "clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "dropout",
                       "feature_dropout", "lift_fresh_copy")
BINARY = {aten.add: operator.add, aten.add_: operator.add, aten.sub: operator.sub, aten.mul: operator.mul,
          aten.mul_: operator.mul, aten.div: operator.truediv, aten.pow: operator.pow}
SAME = {aten.transpose: torch.transpose, aten.permute: torch.permute, aten.flatten: torch.flatten,
        aten.mean: torch.mean, aten.sum: torch.sum, aten.amax: torch.amax, aten.amin: torch.amin,
        aten.select: torch.select, aten.unsqueeze: torch.unsqueeze, aten.squeeze: torch.squeeze,
        aten.max_pool1d: F.max_pool1d, aten.max_pool2d: F.max_pool2d, aten.max_pool3d: F.max_pool3d,
        aten.avg_pool1d: F.avg_pool1d, aten.avg_pool2d: F.avg_pool2d, aten.avg_pool3d: F.avg_pool3d,
        aten.adaptive_avg_pool1d: F.adaptive_avg_pool1d, aten.adaptive_avg_pool2d: F.adaptive_avg_pool2d,
        aten.adaptive_avg_pool3d: F.adaptive_avg_pool3d, aten.adaptive_max_pool2d: F.adaptive_max_pool2d}
DROP = _packets("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async")


def export_graph(model: nn.Module, example_inputs: Any) -> fx.Graph:
    """The model's graph from ``torch.export`` (non-strict) in the walker's vocabulary (module doc).

    ``example_inputs``: a tensor, a tuple of positional inputs or a mapping of keyword inputs.
    Raises whatever ``torch.export.export`` raises when the model cannot be exported."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    sig = ep.graph_signature
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return _Translator(model, params).run(ep.graph)


class _Translator:
    def __init__(self, model: nn.Module, params: dict[str, str]) -> None:
        self.modules = dict(model.named_modules())
        self.params = params  # placeholder name -> parameter / buffer qualified name
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.tuples: dict[fx.Node, fx.Node] = {}  # a multi-output module op -> its first output

    def arg(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env.get(n))

    def run(self, graph: fx.Graph) -> fx.Graph:
        for node in graph.nodes:
            if node.op == "placeholder":
                name = self.params.get(node.name)
                new = self.g.get_attr(name) if name is not None else self.g.placeholder(node.name)
            elif node.op == "output":
                self.g.output(self.arg(node.args[0]))
                continue
            elif node.op == "call_function":
                new = self.call(node)
                if new is None:
                    continue
            else:  # get_attr of a lifted constant and the like: an untracked value
                new = self.g.create_node(node.op, node.target, (), {}, name=node.name)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                new.meta["tensor_meta"] = _Meta(tuple(int(s) for s in val.shape))
            self.env[node] = new
        return self.g

    def owner(self, weight: Any, types) -> str | None:
        """Name of the module of type ``types`` whose ``weight`` is the placeholder ``weight``."""
        name = self.params.get(weight.name) if isinstance(weight, fx.Node) else None
        if name is None or not name.endswith(".weight") and name != "weight":
            return None
        mod = name.rpartition(".")[0]
        return mod if isinstance(self.modules.get(mod), types) else None

    def call(self, node: fx.Node) -> fx.Node | None:
        tgt, args = node.target, node.args
        packet = getattr(tgt, "overloadpacket", None)
        if tgt is operator.getitem and args[0] in self.tuples and args[1] == 0:
            return self.tuples[args[0]]
        if packet in DROP:
            return None
        if packet in MODULE_OPS:
            types, wi, xi = MODULE_OPS[packet]
            name = self.owner(args[wi] if len(args) > wi else node.kwargs.get("weight"), types)
            if name is not None:
                new = self.g.call_module(name, (self.arg(args[xi]),))
                if packet is aten._native_batch_norm_legit_no_training:
                    self.tuples[node] = new
                return new
        elif packet in ELEMENTWISE:
            return self.g.call_method("clone", (self.arg(args[0]),))
        elif packet in BINARY:
            return self.g.call_function(BINARY[packet], self.arg(tuple(args[:2])))
        elif packet in SAME:
            return self.g.call_function(SAME[packet], self.arg(tuple(args)), self.arg(dict(node.kwargs)))
        elif packet is aten.slice:
            return self.g.call_function(torch.narrow, self.arg(tuple(args[:2])) if len(args) > 1 else
                                        (self.arg(args[0]), 0))
        elif packet in (aten.t, aten.numpy_T):
            return self.g.call_function(torch.transpose, (self.arg(args[0]), 0, 1))
        return self.g.create_node("call_function", tgt, self.arg(tuple(args)), self.arg(dict(node.kwargs)),
                                  name=node.name)
