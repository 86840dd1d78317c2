"""Which weights of a model become N:M, and why the others stay dense.

Pure planning: nothing here modifies the model. :func:`plan` walks the modules in registration
order and returns one :class:`LayerEntry` per weight-bearing module: sparse, or dense with a reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, Sequence

from torch import nn
from torch.nn.utils import parametrize

from nmsparse.layout import SUPPORTED_LAYERS, check_layout, unsupported_reason
from nmsparse.nmmasks import check_nm

KEEP_DENSE = ("first", "last")
Patterns = str | Iterable[str] | None


@dataclasses.dataclass
class LayerEntry:
    """One weight-bearing module: ``param`` is the dense weight's name in the original model."""

    name: str
    param: str
    kind: str
    shape: tuple[int, ...]
    sparse: bool
    reason: str = ""
    layout: str | None = None


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
                 "sparse" if e.sparse else f"dense: {e.reason}")
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


def plan(
    model: nn.Module,
    n: int,
    m: int,
    *,
    layout: str = "channels",
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
) -> list[LayerEntry]:
    """Decide, without touching ``model``, which weights become N:M (N kept per M).

    Weight layers are ordered by module registration. ``include`` / ``exclude`` are ``fnmatch``
    patterns on module names (``"layer1.*"``); a pattern that matches no module is an error, since it
    is almost always a typo. ``keep_dense`` keeps the first and/or last weight layer dense.
    """
    n, m = check_nm(n, m)
    check_layout(layout)
    keep = check_keep_dense(keep_dense)
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
        if isinstance(mod, SUPPORTED_LAYERS):
            if parametrize.is_parametrized(mod, "weight"):
                from nmsparse.parametrization import NMParametrization

                if any(isinstance(p, NMParametrization) for p in mod.parametrizations["weight"]):
                    raise ValueError(
                        f"layer {name or '<root>'} is already N:M sparse; call nmsparse.finalize(model) "
                        "before sparsifying or pruning it again"
                    )
            shape = tuple(mod.weight.shape)
            entries.append(LayerEntry(name, _join(name, "weight"), type(mod).__name__, shape, True, layout=layout))
        else:
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() >= 2:
                    entries.append(
                        LayerEntry(name, _join(name, pname), type(mod).__name__, tuple(p.shape), False,
                                   f"{type(mod).__name__} is not supported (only Linear and Conv1d/2d/3d)")
                    )

    weight_layers = [e for e in entries if e.sparse]
    first = weight_layers[0].name if weight_layers else None
    last = weight_layers[-1].name if weight_layers else None
    by_name = dict(modules)
    for e in weight_layers:
        reason = None
        if "first" in keep and e.name == first:
            reason = "first weight layer (keep_dense)"
        elif "last" in keep and e.name == last:
            reason = "last weight layer (keep_dense)"
        elif inc is not None and not any(fnmatch.fnmatchcase(e.name, p) for p in inc):
            reason = "not matched by include"
        elif exc is not None and any(fnmatch.fnmatchcase(e.name, p) for p in exc):
            reason = "matched by exclude"
        elif parametrize.is_parametrized(by_name[e.name], "weight"):
            reason = "weight already has another parametrization"
        else:
            reason = unsupported_reason(by_name[e.name], n, m, layout)
        if reason:
            e.sparse, e.reason = False, reason
    return entries


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
