"""Shard-local N:M masks under FSDP2: each rank computes the masks of its own rows, and FSDP2
all-gathers ``E * W`` instead of ``W``.

N:M groups run along a layer's input dimension, and FSDP2 shards a weight on dim 0 (output rows):
a rank's rows hold whole groups, so the rank computes their mask from its shard alone. The forward
needs the whole ``E * W``; gathering the shard's ``E * W`` (FSDP2's ``fsdp_pre_all_gather`` tensor
extension, the hook float8 training uses) moves exactly the bytes gathering ``W`` would: no
collective of its own, and each rank computes 1/world of the masks. What the dense ``W`` was needed
for beyond ``E * W`` happens on the shard too, after FSDP2's reduce-scatter (a post-accumulate-grad
hook on the sharded parameter): SR-STE's ``decay * (~E) * W`` is added to the shard's gradient, and
``"fixed"`` masks multiply it by ``E``. The result equals training without sharding (same masks,
same updates up to float summation order).

Contract, per sparse layer (checked by :func:`check_local`, before anything is changed):

* The rows a rank holds must be whole mask units along dim 0: any rows for plain masks of
  ``(out, in, ...)`` weights, a multiple of ``m`` for transposable masks (whole m x m tiles) and
  for ``transformers``' ``Conv1D`` (stored ``(in, out)``: dim 0 is the input, i.e. the groups).
  FSDP2 gives ``ceil(rows / world)`` rows to each rank, the last ones fewer.
* Not for weights shared by several modules, nor for ``backend="semi-structured"``.

The ``mask`` buffer becomes a DTensor sharded like the weight (each rank holds its rows; DCP saves
the shards, a full state dict gathers them); ``step`` stays a plain tensor, equal on every rank.
When masks refresh: on each training-mode forward all-gather (not on the re-gather of a backward
pass, which reuses the forward's mask), under the layer's ``update_every`` schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from nmsparse.masking.layout import _kind
from nmsparse.surgery.parametrization import NMParametrization, SharedNM

aten = torch.ops.aten

# ops whose results are the shard (views, or its new home) and must keep gathering E * W: what
# fully_shard does to a parameter (chunk, narrow, new_zeros + copy_, view), detach, and moves
# (``.to(device)``, FSDP2's CPU offload); any other result (a clone, arithmetic) is a plain tensor
_KEEP = {aten.view.default, aten._unsafe_view.default, aten.as_strided.default, aten.slice.Tensor,
         aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
         aten.detach.default, aten.alias.default, aten.new_zeros.default, aten.new_empty.default,
         aten.new_empty_strided.default, aten._to_copy.default}


class MaskedShard(torch.Tensor):
    """A sparse layer's dense weight (or its shard) that FSDP2 all-gathers as ``E * W``.

    Behaves as the plain tensor it wraps (``.data_`` below) for every op; views and copies of it
    stay ``MaskedShard`` (so ``fully_shard``'s chunking keeps it), in-place ops write the wrapped
    tensor. ``owner`` is the layer's :class:`NMParametrization`, whose ``mask`` holds this shard's
    rows."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, owner: NMParametrization):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                                storage_offset=data.storage_offset(), dtype=data.dtype,
                                                device=data.device, requires_grad=data.requires_grad)
        t.data_, t.owner = data, owner
        return t

    def __repr__(self) -> str:
        return f"MaskedShard({self.data_!r})"

    def __tensor_flatten__(self):
        return ["data_"], self.owner

    @staticmethod
    def __tensor_unflatten__(inner, owner, outer_size, outer_stride):
        return MaskedShard(inner["data_"], owner)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner, wrapper_of = None, {}

        def unwrap(t):
            nonlocal owner
            owner = owner or t.owner
            wrapper_of[id(t.data_)] = t
            return t.data_

        args, kwargs = tree_map_only(MaskedShard, unwrap, (args, kwargs))
        out = func(*args, **kwargs)
        if func in _KEEP:
            return tree_map_only(torch.Tensor, lambda t: MaskedShard(t, owner), out)
        # an in-place op returns its (unwrapped) input: hand back the wrapper
        return tree_map_only(torch.Tensor, lambda t: wrapper_of.get(id(t), t), out)

    # --- FSDP2's all-gather extension -----------------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        p = self.owner
        if module.training and torch._C._current_graph_task_id() == -1:  # a forward, not a backward
            refresh_local(p, self.data_)
        local = p.mask.to_local()
        masked = self.data_ * local.to(self.dtype)
        rows = math.ceil(outer_size[0] / mesh.size())  # FSDP2's padded shard
        if masked.shape[0] != rows:
            masked = torch.cat([masked, masked.new_zeros((rows - masked.shape[0], *masked.shape[1:]))])
        if mp_policy is not None and mp_policy.param_dtype is not None:
            masked = masked.to(mp_policy.param_dtype)
        return (masked.contiguous(),), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,) = all_gather_outputs
        if out is not None:  # FSDP2 re-gathers into the same storage: the parameter already views it
            return None
        return gathered, ()


@torch.no_grad()
def refresh_local(p: NMParametrization, shard: torch.Tensor) -> None:
    """Count one training-mode pass of ``p``'s layer and, when its schedule says so, recompute the
    mask of this rank's rows from its ``shard`` of the dense weight (no communication)."""
    if p.method != "fixed" and p.tick() and shard.numel():  # a rank may hold no rows
        local = p.mask.to_local()
        local.copy_(p.mask_fn(shard).to(device=local.device, dtype=torch.bool))


def rows_unit(mod: nn.Module, tname: str, p: NMParametrization) -> int:
    """Rows along dim 0 that must stay together on one rank for ``p``'s mask: ``m`` for transposable
    masks and for weights stored ``(in, out)`` (``Conv1D``), else 1."""
    return p.m if p.transposable or _kind(mod, tname) == "transposed" else 1


def check_local(layers: list, world: int) -> None:
    """Raise ValueError, naming the layer, when a sparse layer cannot have shard-local masks over
    ``world`` ranks (see module doc). ``layers``: ``(name, module, tensor name, parametrization)``."""
    for name, mod, tname, p in layers:
        plist = mod.parametrizations[tname]
        if any(isinstance(q, SharedNM) for q in plist) or getattr(p, "shared", False):
            raise ValueError(f"layer {name!r}: its weight is shared by several modules; shard-local masks "
                             "do not support that: use shard(..., masks='gathered') (nmsparse train --fsdp-masks gathered)")
        if "forward" in vars(mod) or len(plist) != 1:  # a backend replaced its forward
            raise ValueError(f"layer {name!r}: shard-local masks need the dense backend and N:M as the only "
                             "parametrization; use shard(..., masks='gathered') (nmsparse train --fsdp-masks gathered)")
        rows = plist.original.shape[0]
        per_rank = math.ceil(rows / world)
        last = rows - per_rank * (world - 1)
        unit = rows_unit(mod, tname, p)
        if unit > 1 and (per_rank % unit or last % unit or last < 0):
            what = "transposable m x m tiles" if p.transposable else f"groups of {p.m} (dim 0 is the input)"
            raise ValueError(
                f"layer {name!r}: weight {tuple(plist.original.shape)} over {world} ranks puts {per_rank} rows "
                f"on a rank, not whole {what}; shard-local masks need rows per rank to be a multiple of {unit}: "
                "use another number of processes or shard(..., masks='gathered') "
                "(nmsparse train --fsdp-masks gathered)")


def prepare(layers: list) -> None:
    """Before ``fully_shard``: make each layer's dense weight a :class:`MaskedShard` and its
    parametrization pass ``E * W`` through (FSDP2 gathers it masked)."""
    for _, mod, tname, p in layers:
        plist = mod.parametrizations[tname]
        old = plist.original
        plist._parameters["original"] = nn.Parameter(MaskedShard(old.data, p), requires_grad=old.requires_grad)
        p.gathered_masked = True


def finish(layers: list, mesh) -> None:
    """After ``fully_shard``: shard each ``mask`` buffer like its weight, and add SR-STE's decay
    (or the fixed mask) to the sharded gradient after each reduce-scatter."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    for _, mod, tname, p in layers:
        full = p.mask
        chunks = torch.chunk(full, world, dim=0)  # FSDP2's split: fewer chunks than ranks when rows < world
        local = chunks[rank] if rank < len(chunks) else full[:0]
        p.mask = DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False,
                                    shape=full.shape, stride=full.stride())
        param = mod.parametrizations[tname].original
        if p.method in ("srste", "fixed"):
            param.register_post_accumulate_grad_hook(_grad_hook(p))


def reshard_before_training_forward(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook (placed before FSDP2's) for ``reshard_after_forward=False``: a unit still
    unsharded from an earlier forward (an evaluation pass) is resharded, so that this training
    forward all-gathers, and its masks refresh, as after a backward pass."""
    if module.training and torch._C._current_graph_task_id() == -1:
        module.reshard()


def _grad_hook(p: NMParametrization):
    def hook(param) -> None:
        if param.grad is None:
            return
        g, mask = param.grad.to_local(), p.mask.to_local()
        with torch.no_grad():
            if p.method == "srste":
                g.add_(p.decay * (~mask) * param.to_local().data_)
            else:
                g.mul_(mask)
    return hook


def local_weight(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor a :class:`MaskedShard` (or a DTensor of one) wraps, for checkpoint writers
    and state dicts."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, MaskedShard):  # a "full" tensor on a one-rank mesh is the shard itself
        return t.data_
    if isinstance(t, DTensor) and isinstance(t._local_tensor, MaskedShard):
        return DTensor.from_local(t._local_tensor.data_, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    return t
