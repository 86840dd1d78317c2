"""The repeated blocks of a model, and forward hooks that record each block's output.

:func:`find_blocks` names every child of a ``nn.ModuleList`` or ``nn.Sequential`` whose children
are two or more modules of one class (a transformer's layers, a ResNet stage's basic blocks), the
outermost such lists only. :class:`BlockOutputs` records, during one forward pass, the hidden state
each named block returns (the first element of a tuple, ``hidden_states`` of a mapping).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


def _is_block_list(mod: nn.Module) -> bool:
    kids = list(mod.children())
    return isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(kids) >= 2 and len({type(k) for k in kids}) == 1


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of ``model`` in forward-definition order (see module doc); ``[]`` when it
    has none. Lists inside a block are not searched (the block's output covers them)."""
    names: list[str] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_block_list(child):
                names.extend(f"{full}.{k}" for k, _ in child.named_children())
            else:
                walk(full, child)

    walk("", model)
    return names


def hidden_of(out: Any) -> torch.Tensor | None:
    """The hidden state a block returned: a tensor, a tuple's first element, ``hidden_states``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and isinstance(out.get("hidden_states"), torch.Tensor):
        return out["hidden_states"]
    h = getattr(out, "last_hidden_state", None)
    return h if isinstance(h, torch.Tensor) else None


class BlockOutputs:
    """Forward hooks on ``model``'s blocks ``names``; ``self.outputs[name]`` is the block's last
    hidden state. Use as a context manager (hooks removed on exit), clear between passes."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no module named {missing[0]!r} (a block of the teacher): "
                             "student and teacher must have the same architecture")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            h = hidden_of(out)
            if h is None:
                raise ValueError(f"block {name!r} ({type(module).__name__}) returned a {type(out).__name__}, "
                                 "not a hidden-state tensor: pass hidden_weight=0 or blocks=[...] naming others")
            self.outputs[name] = h

        return hook

    def clear(self) -> None:
        self.outputs = {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BlockOutputs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
