"""How a sparsified layer computes during training: ``backend="dense"`` or a registered kernel back end.

``"dense"`` (the default) is the portable masked-dense path: the layer's parametrization hands
``E * W`` to the layer's own forward (``F.linear`` / ``F.conv*``).

Other back ends live in the back-end layer (``"semi-structured"``: :mod:`nmsparse.kernels.semi_training`,
2:4 sparse kernels) and register themselves here with :func:`register` when their package is imported
(``import nmsparse`` imports them all), so that module surgery never imports a back end. A back end
is an object with ``name``, ``check(n, m)`` (one ``ValueError`` for a pattern it cannot run),
``attach(module, parametrization) -> str`` (set it up on one layer that :func:`nmsparse.sparsify` just
made sparse; returns a one-line note for the report) and ``detach(module)`` (undo it;
:func:`nmsparse.finalize` calls it).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class TrainingBackend(Protocol):
    name: str

    def check(self, n: int, m: int) -> None: ...

    def attach(self, module: nn.Module, parametrization: nn.Module) -> str: ...

    def detach(self, module: nn.Module) -> None: ...


_REGISTRY: dict[str, TrainingBackend] = {}


def register(backend: TrainingBackend) -> None:
    """Make ``backend`` available as ``sparsify(..., backend=backend.name)``."""
    _REGISTRY[backend.name] = backend


def names() -> tuple[str, ...]:
    """The valid ``backend`` values: ``"dense"`` and every registered back end."""
    return ("dense", *_REGISTRY)


def check_backend(backend: object, n: int, m: int) -> str:
    """Validate ``backend`` for an N:M setting (N kept per M); one clear ``ValueError`` otherwise."""
    if backend != "dense" and backend not in _REGISTRY:
        raise ValueError(f"backend must be one of {names()}, got {backend!r}")
    if backend != "dense":
        _REGISTRY[backend].check(n, m)  # type: ignore[index]
    return backend  # type: ignore[return-value]


def attach(module: nn.Module, parametrization: nn.Module, backend: str) -> str:
    """Set up ``backend`` on one layer that :func:`nmsparse.sparsify` just made sparse; the report's note."""
    if backend == "dense":
        return "masked dense"
    return _REGISTRY[backend].attach(module, parametrization)


def detach(module: nn.Module) -> None:
    """Remove what any back end set on ``module`` (the module's class forward applies again)."""
    for backend in _REGISTRY.values():
        backend.detach(module)
