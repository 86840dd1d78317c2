"""Each pruning method's options as a small frozen dataclass, and block reconstruction's.

``prune(model, n, m, method=SparseGPT(damp=0.02))`` is the same as ``method="sparsegpt", damp=0.02``;
a string names a method with its defaults. :func:`resolve` turns what the caller gave (a string plus
the old per-method keyword arguments, or an options object) into one options object, and refuses an
option that the chosen method does not take, instead of ignoring it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

__all__ = ["AdaPrune", "BlockReconstruct", "Magnitude", "MethodOptions", "SparseGPT", "Wanda", "resolve",
           "resolve_reconstruct", "UNSET", "PER_METHOD"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: Default of prune()'s per-method keyword arguments: "not given".
UNSET: Any = _Unset()


def _positive(owner: str, what: str, value: object, integer: bool = False, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
    if ok:
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)  # type: ignore[arg-type]
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{owner}: {what} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of the method option classes; ``name`` is the method's string shortcut."""

    name: ClassVar[str] = ""
    needs_calib: ClassVar[bool] = True

    def settings(self) -> dict[str, Any]:
        """What the report records: the method's name and the options that take effect."""
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Magnitude(MethodOptions):
    """Keep the N largest ``|w|`` of every group of M (NVIDIA ASP's one-shot step); no options."""

    name: ClassVar[str] = "magnitude"
    needs_calib: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class Wanda(MethodOptions):
    """Keep the N largest ``|w| * ||x||`` (Sun et al., 2023); no weight update, no options."""

    name: ClassVar[str] = "wanda"


@dataclasses.dataclass(frozen=True)
class SparseGPT(MethodOptions):
    """OBS pruning with weight update (Frantar and Alistarh, 2023). ``damp``: Hessian dampening relative
    to the mean of diag(X^T X); ``blocksize``: columns updated lazily at once (rounded down to M);
    ``precision``: ``"float64"`` (default) or ``"float32"`` for the Cholesky factorizations and the
    column loop (about twice as fast on CPUs; what the reference code and llm-compressor use; the
    Gram matrix is accumulated in float64 either way)."""

    name: ClassVar[str] = "sparsegpt"
    damp: float = 0.01
    blocksize: int = 128
    precision: str = "float64"

    def __post_init__(self) -> None:
        _positive("SparseGPT", "damp", self.damp, allow_zero=True)
        _positive("SparseGPT", "blocksize", self.blocksize, integer=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"SparseGPT: precision must be one of {PRECISIONS}, got {self.precision!r}")


PRECISIONS = ("float64", "float32")
_ADAM_ONLY = ("iterations", "batch_size", "lr", "bias_lr")


@dataclasses.dataclass(frozen=True)
class AdaPrune(MethodOptions):
    """Magnitude mask, then refit the kept weights and bias of each layer to the dense layer's outputs
    (Hubara et al., 2021). ``solver="exact"``: ridge least squares per row, ridge ``damp`` relative to
    mean diag(X^T X). ``solver="adam"``: the paper's Adam, ``iterations`` steps over mini-batches of
    ``batch_size`` calibration samples, learning rates ``lr`` (weights) and ``bias_lr``. Setting an
    option of the other solver to a value other than its default is an error."""

    name: ClassVar[str] = "adaprune"
    solver: str = "exact"
    damp: float = 0.01
    iterations: int = 1000
    batch_size: int = 50
    lr: float = 1e-3
    bias_lr: float = 1e-2

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"AdaPrune: solver must be one of {SOLVERS}, got {self.solver!r}")
        _positive("AdaPrune", "damp", self.damp, allow_zero=True)
        _positive("AdaPrune", "iterations", self.iterations, integer=True, allow_zero=True)
        _positive("AdaPrune", "batch_size", self.batch_size, integer=True)
        _positive("AdaPrune", "lr", self.lr)
        _positive("AdaPrune", "bias_lr", self.bias_lr)
        if self.solver == "exact":
            odd = [k for k in _ADAM_ONLY if getattr(self, k) != _DEFAULT_ADAPRUNE[k]]
            if odd:
                raise ValueError(f"AdaPrune: {', '.join(odd)} only apply to solver='adam', not solver='exact' "
                                 "(pass solver='adam' or drop them)")
        elif self.damp != _DEFAULT_ADAPRUNE["damp"]:
            raise ValueError("AdaPrune: damp only applies to solver='exact', not solver='adam' "
                             "(pass solver='exact' or drop it)")

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"method": self.name, "solver": self.solver}
        if self.solver == "adam":
            s.update({k: getattr(self, k) for k in _ADAM_ONLY})
        else:
            s["damp"] = self.damp
        return s


SOLVERS = ("exact", "adam")
#: prune()'s per-method keyword arguments (each belongs to one or more option classes).
PER_METHOD = ("solver", "damp", "iterations", "batch_size", "lr", "bias_lr", "blocksize")
_DEFAULT_ADAPRUNE = {"damp": 0.01, "iterations": 1000, "batch_size": 50, "lr": 1e-3, "bias_lr": 1e-2}
BY_NAME: dict[str, type[MethodOptions]] = {c.name: c for c in (Magnitude, Wanda, SparseGPT, AdaPrune)}
METHODS = tuple(BY_NAME)


def _takes(cls: type[MethodOptions]) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    return f"takes {', '.join(names)}" if names else "takes no options"


def resolve(method: object, given: dict[str, Any]) -> MethodOptions:
    """The options object for ``method`` (a name from :data:`METHODS` or a :class:`MethodOptions`)
    and the per-method keyword arguments ``given`` (those not :data:`UNSET`). Raises ValueError for an
    unknown method, an option the method does not take, or an option given both ways."""
    given = {k: v for k, v in given.items() if v is not UNSET}
    if isinstance(method, MethodOptions):
        if given:
            k = next(iter(given))
            raise ValueError(f"{k}={given[k]!r} given as a keyword of prune() together with method={method!r}: "
                             f"set it in the options object instead, e.g. {type(method).__name__}({k}=...)")
        return method
    if isinstance(method, type) and issubclass(method, MethodOptions):
        raise ValueError(f"method={method.__name__} is a class: pass an instance, {method.__name__}()")
    if not isinstance(method, str) or method not in BY_NAME:
        raise ValueError(f"method must be one of {METHODS} or an options object (nmsparse.Magnitude(), "
                         f"nmsparse.Wanda(), nmsparse.SparseGPT(...), nmsparse.AdaPrune(...)), got {method!r}")
    cls = BY_NAME[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    for k, v in given.items():
        if k not in fields:
            owners = [c.name for c in BY_NAME.values() if k in {f.name for f in dataclasses.fields(c)}]
            raise ValueError(f"{k}={v!r} does not apply to method={method!r} (it is an option of "
                             f"{' and '.join(repr(o) for o in owners)}); {method!r} {_takes(cls)}")
    if cls is AdaPrune and given.get("solver", "exact") not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {given['solver']!r}")
    try:
        return cls(**given)
    except ValueError as e:  # name the keyword, not the class, for keyword callers
        raise ValueError(str(e).split(": ", 1)[1]) from None


@dataclasses.dataclass(frozen=True)
class BlockReconstruct:
    """Block-wise reconstruction after a block's masks are chosen: Adam over all the block's parameters
    jointly (kept weights, biases, norms; pruned positions stay zero), on the mean squared
    error between the pruned block's output and the target on the cached calibration inputs.

    ``target="dense"``: the dense block's output on the same inputs (the pruned model's inputs to
    this block); ``"teacher"``: the dense model's own hidden states there (the inputs of the dense
    model, so the block also makes up for the error of the blocks before it). ``steps``: Adam steps
    at most, one calibration batch per step; ``lr``: Adam's learning rate; ``held_out``: fraction of
    the calibration batches (at least one, when there are two or more) not trained on: every
    ``eval_every`` steps their loss is measured and the weights with the lowest held-out loss are
    kept; training stops after ``patience`` evaluations without improvement."""

    steps: int = 300
    lr: float = 1e-4
    held_out: float = 0.2
    eval_every: int = 10
    patience: int = 5
    target: str = "dense"

    def __post_init__(self) -> None:
        _positive("BlockReconstruct", "steps", self.steps, integer=True, allow_zero=True)
        _positive("BlockReconstruct", "lr", self.lr)
        _positive("BlockReconstruct", "eval_every", self.eval_every, integer=True)
        _positive("BlockReconstruct", "patience", self.patience, integer=True)
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, (int, float)) \
                or not 0 <= self.held_out < 1:
            raise ValueError(f"BlockReconstruct: held_out must be a fraction in [0, 1), got {self.held_out!r}")
        if self.target not in ("dense", "teacher"):
            raise ValueError(f"BlockReconstruct: target must be 'dense' or 'teacher', got {self.target!r}")


def resolve_reconstruct(value: object) -> BlockReconstruct | None:
    """``None``/``"layer"`` (each layer on its own, the default), ``"block"`` (:class:`BlockReconstruct`
    defaults) or a :class:`BlockReconstruct`."""
    if value is None or value == "layer":
        return None
    if value == "block":
        return BlockReconstruct()
    if isinstance(value, BlockReconstruct):
        return value
    raise ValueError(f"reconstruct must be None, 'layer', 'block' or a nmsparse.BlockReconstruct(...), got {value!r}")
