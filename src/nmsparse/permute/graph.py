"""Which layers must share one input-channel permutation: a walk over the model's graph (from
``torch.fx`` or ``torch.export``, see :mod:`nmsparse.permute.tracing`).

Permuting a layer's input channels keeps the model's function only if the tensor it reads is
permuted the same way where it is produced. Every Linear / Conv (groups = 1) / Embedding output
starts a *channel space*; the walk follows each tensor's channel dimension through the graph:

* pass-through (the space and its channel dim flow on): activations, dropout, identity, pooling
  over spatial dims, ``flatten`` / ``transpose`` / ``permute`` that keep the channels whole,
  reductions, ``select``, ``narrow``, ``unsqueeze``, ``squeeze`` over other dims, a depthwise conv
  (its weight rows follow the permutation), BatchNorm over dim 1 and LayerNorm over the last dim
  (their statistics are per channel resp. invariant under a permutation of the channels; their
  weight, bias and running statistics follow it).
* ties: an elementwise op between two tracked tensors (a residual addition) merges their spaces,
  so every producer and consumer on either side shares one permutation; an elementwise op with a
  parameter of full channel size (a ViT's position embedding) permutes that parameter too.
* stops (the space is *blocked* and every layer on it stays unpermuted, with the reason): reshape /
  view / cat / getitem / matmul / an attention head split, a select or slice of some channels,
  anything not listed above, a grouped conv, a space that reaches the model's output, a module used
  twice on different spaces.

Nothing here modifies the model.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from nmsparse.surgery.selection import tied_aliases

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
                       nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
                       nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
ELEMENTWISE_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid,
                         F.hardtanh, F.mish, F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid,
                         torch.tanh, torch.abs, torch.neg, operator.neg, torch.exp, torch.erf, torch.sqrt,
                         torch.rsqrt, torch.pow, operator.pow}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "half", "double",
                       "bfloat16", "to", "type_as", "abs", "neg", "exp", "sqrt", "rsqrt", "pow", "relu_"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
          operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_"}
POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
HARMLESS_METHODS = {"size", "dim"}  # read shape only: channel order does not matter


@dataclasses.dataclass
class Space:
    """One channel space: every layer on it takes one permutation of ``size`` channels.

    ``producers``: modules whose output rows (Conv/Linear weight dim 0, bias; Embedding weight
    dim 1) are permuted. ``consumers``: modules whose input channels (weight dim 1) are permuted.
    ``members``: ``(kind, name, dim)`` for the rest: ``"bn"``, ``"ln"``, ``"depthwise"`` modules and
    ``"param"`` parameters (permuted along ``dim``). ``blocked``: why it cannot be permuted, or None.
    """

    id: int
    size: int
    producers: list[str] = dataclasses.field(default_factory=list)
    consumers: list[str] = dataclasses.field(default_factory=list)
    members: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)
    blocked: str | None = None


@dataclasses.dataclass
class Analysis:
    """``spaces``: the distinct channel spaces; ``input_space``: module name -> id of the space its
    input channels belong to, or a reason string when they belong to none (e.g. the model input)."""

    spaces: list[Space]
    input_space: dict[str, int | str]
    tracer: str = "torch.fx"


class Stopped(str):
    """The value of a node downstream of an op the walk does not follow: why."""


class TraceError(RuntimeError):
    """The model could not be traced symbolically."""


class Walker:
    """The walk over ``graph`` (a ``torch.fx`` graph in the vocabulary of the module doc, with
    ``meta["tensor_meta"].shape`` on its nodes) whose ``call_module`` targets and ``get_attr`` names
    are those of ``model``."""

    def __init__(self, graph: fx.Graph, model: nn.Module) -> None:
        self.graph = graph
        self.model = model
        self.modules = dict(model.named_modules())
        self.parent: list[int] = []
        self.spaces: list[Space] = []
        self.reasons: list[str | None] = []
        self.val: dict[fx.Node, tuple[int, int] | str] = {}  # node -> (space, channel dim) | "param"
        self.input_space: dict[str, int | str] = {}
        self.roles: dict[tuple[str, str], set[int]] = {}  # (name, side) -> spaces

    # -- union-find -------------------------------------------------------------------------------
    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(Space(len(self.spaces), size))
        self.reasons.append(None)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.reasons[a] = self.reasons[a] or self.reasons[b]

    def block(self, s: int, why: str, node: fx.Node | None = None) -> None:
        s = self.find(s)
        self.reasons[s] = self.reasons[s] or why
        if node is not None:
            self.val[node] = Stopped(f"its input channels come through {why}")

    def role(self, name: str, side: str, s: int) -> None:
        self.roles.setdefault((name, side), set()).add(s)

    # -- helpers --------------------------------------------------------------------------------
    def tracked(self, a: Any) -> tuple[int, int] | None:
        v = self.val.get(a) if isinstance(a, fx.Node) else None
        return v if isinstance(v, tuple) else None

    def shape(self, a: Any) -> tuple[int, ...] | None:
        meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def block_inputs(self, node: fx.Node, why: str) -> None:
        for a in _flat(node.args) + _flat(node.kwargs):
            t = self.tracked(a)
            if t:
                self.block(t[0], why)
        self.val[node] = Stopped(f"its input channels come through {why}")

    def stopped(self, node: fx.Node) -> Stopped | None:
        """The first reason of a stopped input of ``node``, or None."""
        for a in _flat(node.args) + _flat(node.kwargs):
            v = self.val.get(a) if isinstance(a, fx.Node) else None
            if isinstance(v, Stopped):
                return v
        return None

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                self.val[node] = "param"
            elif node.op == "output":
                self.block_inputs(node, "reaches the model output (permuting it would change the output)")
            elif node.op == "call_module":
                self.module(node)
            else:
                self.function(node)
        # a module called on several spaces (weight sharing) cannot take one permutation per call
        for (name, side), ss in self.roles.items():
            roots = {self.find(s) for s in ss}
            if len(roots) > 1:
                for s in roots:
                    self.block(s, f"module {name} is called on several channel spaces ({side})")
        # a parameter tied between modules (an embedding and an LM head) would be permuted once per
        # space it is on, and its other users not at all: leave every space that touches one
        tied: dict[str, str] = {}
        for alias, first in tied_aliases(self.model).items():
            a, b = alias.rpartition(".")[0], first.rpartition(".")[0]
            tied[a], tied[b] = b, a
            tied[alias], tied[first] = first, alias
        for s, sp in enumerate(self.spaces):
            for name in [*sp.producers, *sp.consumers, *(m[1] for m in sp.members)]:
                if name in tied:
                    self.block(s, f"{name} shares its weight with {tied[name]} (tied weights)")
                    break
        merged: dict[int, Space] = {}
        for s in range(len(self.spaces)):
            r = self.find(s)
            tgt = merged.setdefault(r, Space(r, self.spaces[r].size, blocked=self.reasons[r]))
            src = self.spaces[s]
            tgt.producers += [p for p in src.producers if p not in tgt.producers]
            tgt.consumers += [c for c in src.consumers if c not in tgt.consumers]
            tgt.members += [x for x in src.members if x not in tgt.members]
        inputs = {k: (self.find(v) if isinstance(v, int) else v) for k, v in self.input_space.items()}
        return Analysis(list(merged.values()), inputs)

    def module(self, node: fx.Node) -> None:
        name = node.target
        mod = self.modules[name]
        x = node.args[0] if node.args else None
        t = self.tracked(x)
        shape = self.shape(x)
        if isinstance(mod, (nn.Linear, *CONV)) and not (isinstance(mod, CONV) and mod.groups > 1):
            in_dim = -1 if isinstance(mod, nn.Linear) else (1 if shape is None or len(shape) == len(mod.kernel_size) + 2 else 0)
            if t is None:
                self.input_space[name] = self.stopped(node) or "its input is the model input, not a layer output"
            else:
                nd = len(shape) if shape is not None else None
                if nd is None or t[1] != in_dim % nd:
                    self.block(t[0], f"{name} reads a channel dim other than its input features")
                self.input_space[name] = t[0]
                self.spaces[t[0]].consumers.append(name)
                self.role(name, "input", t[0])
            out_shape = self.shape(node)
            s = self.new(mod.weight.shape[0])
            self.spaces[s].producers.append(name)
            self.role(name, "output", s)
            od = len(out_shape) - 1 if isinstance(mod, nn.Linear) else (1 if out_shape is None or len(out_shape) == len(mod.kernel_size) + 2 else 0)
            self.val[node] = (s, od if out_shape is not None else 1)
            return
        if isinstance(mod, CONV):  # grouped / depthwise
            depthwise = mod.groups == mod.in_channels == mod.out_channels
            if depthwise and t is not None and t[1] == (1 if len(shape) == len(mod.kernel_size) + 2 else 0):
                self.spaces[t[0]].members.append(("depthwise", name, 0))
                self.role(name, "depthwise", t[0])
                self.input_space[name] = t[0]  # one weight row per channel: it follows the permutation
                self.val[node] = t
                return
            if t is not None:
                self.block(t[0], f"grouped conv {name} (groups={mod.groups}), which mixes channels within groups only")
            self.input_space[name] = f"grouped conv (groups={mod.groups}): its channels are tied to their groups"
            s = self.new(mod.weight.shape[0])
            self.block(s, f"produced by grouped conv {name} (groups={mod.groups})")
            self.val[node] = (s, 1)
            return
        if isinstance(mod, nn.Embedding):
            s = self.new(mod.weight.shape[1])
            self.spaces[s].producers.append(name)
            self.role(name, "output", s)
            out_shape = self.shape(node)
            self.val[node] = (s, len(out_shape) - 1 if out_shape is not None else 1)
            return
        if t is None:
            if self.stopped(node):
                self.val[node] = self.stopped(node)
            return
        nd = len(shape) if shape is not None else 0
        if isinstance(mod, BN) and t[1] == 1:
            self.spaces[t[0]].members.append(("bn", name, 0))
            self.role(name, "bn", t[0])
            self.val[node] = t
        elif isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1 and t[1] == nd - 1:
            self.spaces[t[0]].members.append(("ln", name, 0))
            self.role(name, "ln", t[0])
            self.val[node] = t
        elif isinstance(mod, ELEMENTWISE_MODULES):
            self.val[node] = t
        elif isinstance(mod, POOL) and t[1] == 1:
            self.val[node] = t
        elif isinstance(mod, nn.Flatten):
            self.flatten(node, t, shape, mod.start_dim, mod.end_dim)
        else:
            self.block(t[0], f"{type(mod).__name__} {name}, which the analysis does not follow", node)

    def function(self, node: fx.Node) -> None:
        tgt, args = node.target, node.args
        method = node.op == "call_method"
        x = args[0] if args else None
        t = self.tracked(x)
        shape = self.shape(x)
        if (method and tgt in BINARY_METHODS) or (not method and tgt in BINARY):
            self.binary(node)
            return
        if method and tgt in HARMLESS_METHODS or (not method and tgt is getattr):
            return
        others = [a for a in _flat(args) + _flat(node.kwargs) if self.tracked(a) and a is not x]
        if t is None or others:
            if t is None and not others:
                if self.stopped(node):
                    self.val[node] = self.stopped(node)
                return  # nothing tracked flows in
            self.block_inputs(node, f"{_opname(node)} ({node.name}), which combines several tensors")
            return
        nd = len(shape) if shape is not None else None
        if (method and tgt in ELEMENTWISE_METHODS) or (not method and tgt in ELEMENTWISE_FUNCTIONS):
            self.val[node] = t
        elif not method and tgt in POOL_FUNCTIONS and t[1] == 1:
            self.val[node] = t
        elif tgt in (torch.flatten, "flatten") and nd is not None:
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            self.flatten(node, t, shape, start, end)
        elif tgt in (torch.transpose, "transpose", torch.swapaxes, "swapaxes") and nd is not None:
            a, b = _arg(node, 1, "dim0", None) % nd, _arg(node, 2, "dim1", None) % nd
            self.val[node] = (t[0], b if t[1] == a else a if t[1] == b else t[1])
        elif tgt in (torch.permute, "permute") and nd is not None:
            dims = args[1:] if method and not isinstance(args[1], (tuple, list)) else args[1]
            dims = [d % nd for d in dims]
            self.val[node] = (t[0], dims.index(t[1]))
        elif tgt in REDUCTIONS or tgt in (torch.mean, torch.sum, torch.amax, torch.amin):
            self.reduction(node, t, nd)
        elif not method and tgt in (torch.select, torch.narrow, torch.unsqueeze, torch.squeeze) and nd is not None:
            self.index(node, t, nd)
        else:
            self.block(t[0], f"{_opname(node)} ({node.name}), which the analysis does not follow", node)

    def reduction(self, node: fx.Node, t: tuple[int, int], nd: int | None) -> None:
        dim = _arg(node, 1, "dim", None)
        keep = bool(_arg(node, 2, "keepdim", False))
        if dim is None or nd is None:
            return  # a full reduction does not depend on the channel order
        dims = {d % nd for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        if t[1] in dims:
            return  # reduced over the channels: invariant under their permutation
        self.val[node] = (t[0], t[1] if keep else t[1] - sum(d < t[1] for d in dims))

    def index(self, node: fx.Node, t: tuple[int, int], nd: int) -> None:
        """select / narrow / unsqueeze / squeeze along ``dim``: the channels pass unless they are the
        dim selected from or cut (a narrow keeping every channel passes)."""
        dim = _arg(node, 1, "dim", None)
        out = self.shape(node)
        if dim is None or out is None:
            self.block(t[0], f"{_opname(node)} ({node.name}) over every dim", node)
            return
        tgt, c = node.target, t[1]
        if tgt is torch.unsqueeze:
            d = dim % (nd + 1)
            self.val[node] = (t[0], c + (d <= c))
        elif dim % nd == c and not (tgt is torch.narrow and out[c] == self.shape(node.args[0])[c]):
            self.block(t[0], f"{_opname(node)} ({node.name}), which takes part of the channels", node)
        elif tgt is torch.narrow:
            self.val[node] = t
        else:  # select, squeeze of a size-1 dim: that dim disappears
            d = dim % nd
            gone = tgt is torch.select or self.shape(node.args[0])[d] == 1
            self.val[node] = (t[0], c - (gone and d < c))

    def flatten(self, node: fx.Node, t: tuple[int, int], shape, start: int, end: int) -> None:
        if shape is None:
            self.block(t[0], f"flatten ({node.name}) of a tensor of unknown shape")
            return
        nd = len(shape)
        start, end = start % nd, end % nd
        d = t[1]
        if d < start:
            self.val[node] = t
        elif d > end:
            self.val[node] = (t[0], d - (end - start))
        elif all(shape[i] == 1 for i in range(start, end + 1) if i != d):
            self.val[node] = (t[0], start)
        else:
            self.block(t[0], f"flatten ({node.name}), which merges the channels with other dims", node)

    def binary(self, node: fx.Node) -> None:
        operands = list(node.args[:2]) + [node.kwargs[k] for k in ("other",) if k in node.kwargs]
        out = self.shape(node)
        tracked = [(a, self.tracked(a)) for a in operands if self.tracked(a)]
        if not tracked:
            return
        if out is None:
            self.block_inputs(node, f"{_opname(node)} ({node.name}) of unknown shape")
            return
        nd = len(out)
        aligned = []
        for a, t in tracked:
            aligned.append((t[0], t[1] + nd - len(self.shape(a))))
        dims = {d for _, d in aligned}
        if len(dims) > 1:
            for s, _ in aligned:
                self.block(s, f"{_opname(node)} ({node.name}) combines channels along different dims")
            return
        d = dims.pop()
        for s, _ in aligned[1:]:
            self.union(aligned[0][0], s)
        s0 = aligned[0][0]
        for a in operands:
            if self.tracked(a) or not isinstance(a, fx.Node):
                continue
            sh = self.shape(a)
            ad = d - (nd - len(sh)) if sh is not None else None
            if sh is None or ad is None:
                self.block(s0, f"{_opname(node)} ({node.name}) with an operand of unknown shape")
            elif ad < 0 or sh[ad] == 1:
                continue  # broadcast along the channels: order does not matter
            elif self.val.get(a) == "param":
                self.spaces[s0].members.append(("param", a.target, ad))
                self.role(a.target, "param", s0)
            else:
                self.block(s0, f"{_opname(node)} ({node.name}) with a per-channel tensor that is not a parameter")
        self.val[node] = (s0, d)


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _flat(x: Any) -> list:
    if isinstance(x, (tuple, list)):
        return [y for z in x for y in _flat(z)]
    if isinstance(x, dict):
        return [y for z in x.values() for y in _flat(z)]
    return [x]


def _opname(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
