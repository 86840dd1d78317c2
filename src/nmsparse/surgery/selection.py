"""Which weights of a model become N:M, and why the others stay dense.

Pure planning: nothing here modifies the model. :func:`plan` walks the modules in registration
order and returns one :class:`LayerEntry` per weight tensor (a ``(module, parameter name)`` pair, see
:mod:`nmsparse.masking.layout`): sparse, or dense with a reason.

Shared weights: one ``Parameter`` reachable from several modules (``head.weight = emb.weight``,
tied embeddings of language models). A module registered under two names, or called twice, is one
module and is not sharing. By default (``shared="dense"``) a shared weight stays dense everywhere,
with the reason ``shared with `<other module>``` in the report, so that no other layer changes.
With ``shared="sparsify"`` its first supported user (the *owner*, e.g. ``lm_head``) is selected as
usual and, when sparse, every other user sees the very same N:M weight (``nmsparse.sparsify`` gives
them the owner's mask; ``nmsparse.prune`` prunes the one Parameter in place).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse.masking.layout import SUPPORTED, check_layout, reduction_dim, target_names, unsupported_reason
from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern

KEEP_DENSE = ("first", "last")
SHARED = ("dense", "sparsify")
Patterns = str | Iterable[str] | None


@dataclasses.dataclass
class LayerEntry:
    """One weight tensor: ``name`` is its module's name, ``param`` the dense tensor's full name in
    the original model (``"layers.0.self_attn.in_proj_weight"``). ``shared_with``: full names of the
    other modules' references to the same Parameter; ``note``: remarks on a sparse entry."""

    name: str
    param: str
    kind: str
    shape: tuple[int, ...]
    sparse: bool
    reason: str = ""
    layout: str | None = None
    shared_with: tuple[str, ...] = ()
    note: str = ""

    @property
    def tensor_name(self) -> str:
        """The tensor's attribute name on its module (``"weight"``, ``"in_proj_weight"``)."""
        return self.param[len(self.name) + 1:] if self.name else self.param


@dataclasses.dataclass
class SparsityReport:
    """What :func:`nmsparse.sparsify` (or :func:`nmsparse.prune`) did, layer by layer."""

    n: int
    m: int
    layers: list[LayerEntry]
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def sparse(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.sparse]

    @property
    def dense(self) -> list[LayerEntry]:
        return [e for e in self.layers if not e.sparse]

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "m": self.m,
            "settings": self.settings,
            "layers": [dataclasses.asdict(e) for e in self.layers],
        }

    def table(self) -> str:
        rows = [("layer", "type", "shape", "layout", f"{self.n}:{self.m}")]
        for e in self.layers:
            rows.append(
                (e.param, e.kind, "x".join(map(str, e.shape)), e.layout or "-",
                 ("sparse" + (f" ({e.note})" if e.note else "")) if e.sparse else f"dense: {e.reason}")
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        total = sum(_numel(e.shape) for e in self.layers)
        kept = sum(_numel(e.shape) * (self.n / self.m if e.sparse else 1) for e in self.layers)
        lines.append(
            f"{len(self.sparse)} sparse, {len(self.dense)} dense; "
            f"{kept / max(total, 1):.1%} of these layers' weights kept"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _patterns(p: Patterns, what: str) -> list[str] | None:
    if p is None:
        return None
    pats = [p] if isinstance(p, str) else list(p)
    for q in pats:
        if not isinstance(q, str):
            raise ValueError(f"{what} takes module-name patterns (str), got {q!r}")
    return pats


def check_keep_dense(keep_dense: object) -> tuple[str, ...]:
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    keep = tuple(keep_dense)  # type: ignore[arg-type]
    bad = [k for k in keep if k not in KEEP_DENSE]
    if bad:
        raise ValueError(f"keep_dense takes a subset of {KEEP_DENSE}, got {bad}; use () to sparsify all")
    return keep


def check_shared(shared: object) -> str:
    if shared not in SHARED:
        raise ValueError(
            f"shared (what happens to a weight shared by several modules) must be one of {SHARED}, got {shared!r}"
        )
    return shared  # type: ignore[return-value]


def _kind_name(mod: nn.Module) -> str:
    cls = type(mod)
    if parametrize.is_parametrized(mod):
        cls = cls.__bases__[0]  # the class parametrize derived the module's class from
    return cls.__name__


def _users(model: nn.Module) -> dict[int, list[tuple[str, str, bool]]]:
    """``id(Parameter) -> [(module name, tensor name, held by a parametrization)]`` over every
    module of ``model`` (each module once, however often it is registered)."""
    users: dict[int, list[tuple[str, str, bool]]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            owner, tensor, parametrized = mname, pname, False
            if isinstance(mod, parametrize.ParametrizationList):
                head, _, tensor = mname.rpartition(".")
                owner = head.removesuffix("parametrizations").removesuffix(".")
                parametrized = True
            users.setdefault(id(p), []).append((owner, tensor, parametrized))
    return users


def _nm_parametrized(mod: nn.Module, tensor: str) -> bool:
    if not parametrize.is_parametrized(mod, tensor):
        return False
    from nmsparse.surgery.parametrization import NMParametrization, SharedNM

    return any(isinstance(p, (NMParametrization, SharedNM)) for p in mod.parametrizations[tensor])


def plan(
    model: nn.Module,
    n: int | NMPattern,
    m: int | None = None,
    *,
    layout: str = "channels",
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    shared: str = "dense",
    transposable: bool = False,
) -> list[LayerEntry]:
    """Decide, without touching ``model``, which weights become N:M (N kept per M; ``n`` may be an
    :class:`~nmsparse.masking.pattern.NMPattern`, ``m`` left out).

    Weight tensors are ordered by module registration. ``include`` / ``exclude`` are ``fnmatch``
    patterns on module names (``"layer1.*"``); a pattern that matches no module is an error, since it
    is almost always a typo. ``keep_dense`` keeps the first and/or last weight layer dense.
    ``shared``: ``"dense"`` (default) or ``"sparsify"``, for weights shared between modules (see the
    module doc); ``"sparsify"`` raises ValueError when the users of a shared weight disagree on its
    reduction axis or one of them holds it under another parametrization. ``transposable=True``
    also requires output sizes that transposable masks can tile (see :func:`nmsparse.masking.layout.unsupported_reason`).
    """
    pattern = check_nm(n, m)
    check_layout(layout)
    keep = check_keep_dense(keep_dense)
    check_shared(shared)
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    modules = [
        (name, mod)
        for name, mod in model.named_modules()
        if not isinstance(mod, parametrize.ParametrizationList)
    ]
    names = [name for name, _ in modules]
    for what, pats in (("include", inc), ("exclude", exc)):
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(nm, p) for nm in names):
                raise ValueError(f"{what} pattern {p!r} matches no module; module names look like {names[1:4]}")

    entries: list[LayerEntry] = []
    for name, mod in modules:
        targets = target_names(mod)
        for t in targets:
            if _nm_parametrized(mod, t):
                raise ValueError(
                    f"layer {name or '<root>'} is already N:M sparse; call nmsparse.finalize(model) "
                    "before sparsifying or pruning it again"
                )
            entries.append(LayerEntry(name, _join(name, t), _kind_name(mod), tuple(getattr(mod, t).shape), True,
                                      layout=layout))
        for pname, p in _own_tensors(mod):
            if pname not in targets and p.dim() >= 2 and not _is_attention_bias(mod, pname):
                reason = f"{_kind_name(mod)} is not supported ({SUPPORTED})"
                if next(mod.children(), None) is not None:  # a container's own parameter (a ViT's position table)
                    reason = (f"a parameter of the {_kind_name(mod)} module itself, not the weight of a supported layer "
                              f"({SUPPORTED})")
                if isinstance(mod, nn.MultiheadAttention) and pname.endswith("_proj_weight"):
                    reason = ("separate q/k/v projection weights (kdim or vdim != embed_dim) are not supported; "
                              "only the packed in_proj_weight is")
                entries.append(LayerEntry(name, _join(name, pname), _kind_name(mod), tuple(p.shape), False, reason))

    by_name = dict(modules)
    followers = _resolve_shared(entries, by_name, _users(model), shared)
    weight_layers = [e for e in entries if e.sparse]
    first = weight_layers[0].param if weight_layers else None
    last = weight_layers[-1].param if weight_layers else None
    for e in weight_layers:
        mod = by_name[e.name]
        reason = None
        if e.shared_with and shared == "dense":
            reason = _shared_reason(e)
        elif "first" in keep and e.param == first:
            reason = "first weight layer (keep_dense)"
        elif "last" in keep and e.param == last:
            reason = "last weight layer (keep_dense)"
        elif inc is not None and not any(fnmatch.fnmatchcase(e.name, p) for p in inc):
            reason = "not matched by include"
        elif exc is not None and any(fnmatch.fnmatchcase(e.name, p) for p in exc):
            reason = "matched by exclude"
        elif parametrize.is_parametrized(mod, e.tensor_name):
            reason = "weight already has another parametrization"
        else:
            reason = unsupported_reason(mod, pattern, layout=layout, transposable=transposable, name=e.tensor_name)
        if reason:
            e.sparse, e.reason = False, reason
    for owner, others in followers:
        for f in others:
            if owner.sparse:
                f.reason = f"shared with `{owner.name}`: N:M there, and this module uses the same N:M weight"
            else:
                f.reason = f"shared with `{owner.name}`, which stays dense ({owner.reason})"
        if owner.sparse:
            owner.note = "shared with " + ", ".join(f"`{s.rpartition('.')[0] or s}`" for s in owner.shared_with) + \
                ": the same N:M weight there"
    return entries


def _own_tensors(mod: nn.Module):
    """``(name, tensor)`` of the module's own parameters, a parametrized one by its computed value."""
    names = list(mod._parameters)
    if parametrize.is_parametrized(mod):
        names += [k for k in mod.parametrizations.keys() if k not in names]
    for k in names:
        t = getattr(mod, k, None)
        if isinstance(t, torch.Tensor):
            yield k, t


def _is_attention_bias(mod: nn.Module, pname: str) -> bool:
    return isinstance(mod, nn.MultiheadAttention) and pname in ("bias_k", "bias_v")


def _shared_reason(e: LayerEntry) -> str:
    others = ", ".join(f"`{s.rpartition('.')[0] or s}`" for s in e.shared_with)
    return f"shared with {others} (pass shared='sparsify' to make it N:M everywhere it is used)"


def _resolve_shared(
    entries: list[LayerEntry], by_name: dict[str, nn.Module], users: dict[int, list[tuple[str, str, bool]]], shared: str
) -> list[tuple[LayerEntry, list[LayerEntry]]]:
    """Fill ``shared_with`` of every entry whose Parameter other modules also hold. With
    ``shared="sparsify"``, returns each owner entry (the first supported user) with the entries of the
    other users; those are taken out of the candidates here and get their reason once the owner is
    decided."""
    by_param = {e.param: e for e in entries}
    followers: list[tuple[LayerEntry, list[LayerEntry]]] = []
    done: set[int] = set()
    for e in entries:
        p = by_name[e.name]._parameters.get(e.tensor_name)
        if p is None or id(p) in done:
            continue
        done.add(id(p))
        us = users.get(id(p), [])
        if len({u[0] for u in us}) < 2:
            continue
        full = [_join(u[0], u[1]) for u in us]
        for u, f in zip(us, full):
            if f in by_param:
                by_param[f].shared_with = tuple(x for x, v in zip(full, us) if v[0] != u[0])
        group = [by_param[f] for f in dict.fromkeys(full) if f in by_param]
        supported = [ent for ent in group if ent.sparse]
        if not supported or shared == "dense":
            for ent in group:
                if not ent.sparse:
                    ent.reason = f"{ent.reason}; {_shared_reason(ent).split(' (')[0]}"
            continue
        owner = supported[0]
        for u, f in zip(us, full):
            if u[2]:
                raise ValueError(
                    f"shared='sparsify': the weight {owner.param} is shared with {f}, which holds it under "
                    "another parametrization; remove that parametrization or untie the weights first"
                )
        rdim = reduction_dim(by_name[owner.name], owner.tensor_name)
        for ent in supported[1:]:
            if reduction_dim(by_name[ent.name], ent.tensor_name) != rdim:
                raise ValueError(
                    f"shared='sparsify': the weight {owner.param} is shared with {ent.param}, which reduces over "
                    "another axis of it, so no mask is N:M for both; untie the weights or pass shared='dense'"
                )
        others = [ent for ent in group if ent is not owner]
        for ent in others:
            ent.sparse = False
        followers.append((owner, others))
    return followers


def literal_pattern(name: str) -> str:
    """An ``include``/``exclude`` pattern (fnmatch) that matches exactly the module name ``name``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """For every parameter reachable under several names in ``model.named_parameters()`` (tied
    weights, a module registered twice): each later name -> the first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
