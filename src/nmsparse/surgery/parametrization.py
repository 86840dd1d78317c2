"""The parametrization that makes one weight N:M sparse during training.

The dense weight ``W`` stays the trained parameter (``parametrizations.weight.original``); the layer
sees ``E * W`` with ``E`` the keep-mask held in the ``mask`` buffer. Gradients, by method:

* ``"ste"``:   ``dL/dW = dL/d(E*W)`` (straight-through: pruned weights keep learning).
* ``"srste"``: ``dL/dW = dL/d(E*W) + decay * (~E) * W`` (SR-STE, Zhou et al. 2021, lambda_w = decay).
* ``"fixed"``: ``dL/dW = E * dL/d(E*W)`` and the mask never changes (prune, then fine-tune).

The mask is recomputed from the current ``W`` by :meth:`NMParametrization.refresh`, which
:mod:`nmsparse.sparsify` calls from a forward pre-hook on training-mode forward passes.

A weight shared by several modules (tied embeddings) gets one :class:`NMParametrization` on its
owner and a :class:`SharedNM` on every other user: they read the owner's mask, so every use sees the
same ``E * W``; SR-STE's decay term is added once (by the owner), and the mask is refreshed by
whichever user runs first after ``W`` changed (for a shared weight ``step`` counts updates of ``W``
seen by training-mode passes rather than passes).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

METHODS = ("ste", "srste", "fixed")


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SRSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask) * weight, None, None


def sparse_weight(weight: torch.Tensor, mask: torch.Tensor, method: str, decay: float = 0.0) -> torch.Tensor:
    """``mask * weight`` with the backward of ``method`` ("ste", "srste" or "fixed", see module doc)."""
    if method == "srste":
        return _SRSTE.apply(weight, mask, decay)
    if method == "ste":
        return _STE.apply(weight, mask)
    if method == "fixed":
        return weight * mask
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


class NMParametrization(nn.Module):
    """Maps a dense weight to its N:M sparse version (see module doc).

    ``mask_fn(weight) -> BoolTensor`` computes the keep-mask in the layer's layout; ``n``, ``m`` and
    ``layout`` are recorded for reports and checks. Buffers ``mask`` and ``step`` (training-mode
    forward passes seen) are part of the ``state_dict``, so a checkpoint resumes the mask schedule.

    ``gathered_masked`` (set by :mod:`nmsparse.training.fsdp_masks`): the weight this module gets is
    already ``E * W`` (FSDP2 gathered it masked); it passes it through, and its mask is refreshed on
    the shard, not by :meth:`refresh`.
    """

    gathered_masked = False

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        n: int,
        m: int,
        layout: str,
        method: str,
        decay: float,
        update_every: int,
        mask_fn: Callable[[torch.Tensor], torch.Tensor],
        transposable: bool = False,
    ) -> None:
        super().__init__()
        self.n, self.m, self.layout = n, m, layout
        self.method, self.decay, self.update_every = method, decay, update_every
        self.transposable = transposable
        self.mask_fn = mask_fn
        with torch.no_grad():
            self.register_buffer("mask", mask_fn(weight.detach()))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=weight.device))
        self.shared = False  # set by sparsify when other modules use this weight (see module doc)
        self._seen: tuple[int, int] | None = None
        self._step_value = 0
        self._mark_step_written()

    # --- the step counter without host syncs ------------------------------------------------------
    # ``step`` (a device tensor, saved and loaded with the state_dict) is the counter of record; the
    # schedule reads a Python int copy, ``_step_value``, so that a training pass never reads a device
    # tensor on the host (on CUDA, ``int(step)`` would wait for the GPU, once per layer per pass).
    # ``_step_written`` is (tensor, version counter, data pointer) of the buffer as this module last
    # wrote it: anything else that writes it (load_state_dict, an in-place copy such as the Hugging
    # Face loader's or DCP's, ``load_state_dict(assign=True)``, ``.data =``) changes one of the three,
    # and the next refresh reads the buffer once. Moves (``.to``, ``.cuda``) keep the value and keep
    # the copy valid (:meth:`_apply`).

    def _mark_step_written(self) -> None:
        s = self.step
        self.__dict__["_step_written"] = (s, s._version, s.data_ptr())

    def step_count(self) -> int:
        """Training-mode passes counted so far (the ``step`` buffer's value), without a host read
        unless something other than :meth:`refresh` wrote the buffer since (a load, once)."""
        s, written = self.step, self.__dict__.get("_step_written")
        if written is None or written[0] is not s or written[1] != s._version or written[2] != s.data_ptr():
            self._step_value = int(s)  # the one host read, after a load
            self._mark_step_written()
        return self._step_value

    def _apply(self, fn, recurse=True):
        value, old = self.step_count(), self.step
        out = super()._apply(fn, recurse)
        if self.step is not old:  # moved or converted: the value is the same (to_empty's garbage is
            self._step_value = value  # overwritten by the next refresh)
            self._mark_step_written()
        return out

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Count one training-mode forward pass; recompute the mask when the schedule says so.

        No host synchronisation: the schedule runs on a Python int (see :meth:`step_count`), and a
        new mask replaces the ``mask`` buffer (a new tensor) instead of being compared with it and
        copied in: a module called twice in one pass keeps, for the first call's backward, the
        mask that call used (autograd's saved-tensor version check never fires)."""
        if self.method == "fixed" or self.gathered_masked:
            return
        if getattr(self, "shared", False):  # several users call this per pass: act once per value of W
            seen = (weight.data_ptr(), weight._version)
            if seen == self._seen:
                return
            self._seen = seen
        if self.tick():
            self.mask = self.mask_fn(weight.detach()).to(device=self.mask.device, dtype=torch.bool)

    def tick(self) -> bool:
        """Count one training-mode pass; True when the ``update_every`` schedule recomputes the mask
        at this pass (no host read, see :meth:`step_count`)."""
        step = self.step_count()
        self.step = self.step + 1  # a new tensor too: DDP's per-pass buffer broadcast (which writes
        self._step_value = step + 1  # the buffers it listed at wrap time) cannot force a host read
        self._mark_step_written()
        return self.update_every == 1 or step % self.update_every == 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.gathered_masked:
            return weight
        return sparse_weight(weight, self.mask, self.method, self.decay)

    def extra_repr(self) -> str:
        t = ", transposable" if self.transposable else ""
        return (
            f"{self.n}:{self.m}, layout={self.layout}, method={self.method}, decay={self.decay}, "
            f"update_every={self.update_every}{t}"
        )


class SharedNM(nn.Module):
    """The parametrization of a shared weight's other users: ``owner.mask * W`` with the owner's
    straight-through backward (no decay: the owner adds it once). Holds no state of its own (the
    owner is referenced, not registered, so its buffers are saved once, under the owner)."""

    def __init__(self, owner: NMParametrization) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # a plain reference, not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["owner"]
        return sparse_weight(weight, owner.mask, "fixed" if owner.method == "fixed" else "ste")

    def extra_repr(self) -> str:
        owner = self.__dict__["owner"]
        return f"shares the mask of a {owner.n}:{owner.m} NMParametrization"
