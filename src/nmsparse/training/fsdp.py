"""N:M sparse training sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Order: :func:`nmsparse.sparsify` first, then :func:`shard` (or ``fully_shard`` directly).
``fully_shard`` records each parameter under the module that owns it; ``sparsify`` moves a layer's
weight into ``parametrizations.weight.original``, so sharding first and sparsifying after would leave
FSDP2 pointing at a parameter that no longer exists (``sparsify`` refuses a sharded model).

What is sharded: every parameter, the dense weights ``original`` included, on dim 0 (output rows)
over the mesh. What is not: buffers. Each sparse layer's ``mask`` (bool, the shape of the whole
weight) and ``step`` stay whole on every rank.

How masks are computed: by default (``shard(masks="local")``) each rank computes the masks of its
own rows from its shard and FSDP2 all-gathers ``E * W`` instead of ``W`` (no communication of its
own; :mod:`nmsparse.training.fsdp_masks`), with the ``mask`` buffers sharded like the weights.
Transposable masks and ``Conv1D`` weights need whole m-row units per rank (checked). With
``masks="gathered"``, FSDP2's pre-forward hook (registered with ``prepend=True``, so it runs before
nmsparse's mask-refresh hook) all-gathers the dense ``W`` and every rank computes every whole mask
from it: no constraint on rows per rank, every mask held whole on every rank. ``docs/distributed.md``
compares the two.

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` write and read model and optimizer
with ``torch.distributed.checkpoint`` (each rank writes and reads its own shards; a resumed run may
use another number of processes). DCP reads its metadata file with ``pickle.load`` and its non-tensor
items (the optimizer's hyperparameters) with ``torch.load(weights_only=False)``; :func:`load_checkpoint`
reads the metadata with an unpickler that only builds DCP's own metadata classes and plain data, and
the non-tensor items with ``weights_only=True``, so no code runs from the folder. Once every shard is
written, rank 0 adds a checksum manifest of the folder (:mod:`nmsparse.plumbing.folder_checksum`);
:func:`load_checkpoint` checks it on rank 0 before any rank reads a shard, so a changed bit in any file is
a ``LoadError`` naming the file, with the model untouched (a folder from before manifests loads
unverified, with a note).

:func:`finalized_state_dict` gathers the whole model on rank 0 (on CPU) and returns it finalized
(``weight = E * W``, no N:M machinery): loadable into the plain architecture.
"""

from __future__ import annotations

import functools
import io
import importlib
import pickle
import sys
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from nmsparse.masking.layout import layer_mask
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.folder_checksum import sign_folder, verify_folder
from nmsparse.surgery.selection import plan
from nmsparse.surgery.sparse_model import sharded, sparse_layers, sparse_tensors


def _require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("FSDP2 needs a process group: run under 'torchrun --nproc_per_node=K' "
                         "(or call torch.distributed.init_process_group first)")


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or a submodule, or some parameter is a DTensor
    (tensor parallel); see :func:`nmsparse.surgery.sparse_model.sharded`."""
    return sharded(model)


def shard(model: nn.Module, *, mesh=None, units: Iterable[nn.Module] | None = None,
          reshard_after_forward: bool = True, masks: str = "local") -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to each module of ``units``, then to ``model``; returns ``model``.

    ``units`` defaults to every N:M sparse layer (its own all-gather group, so its dense weight is
    gathered just before its forward); pass a model's blocks (e.g. transformer layers) for larger
    groups. ``mesh`` defaults to a 1-D mesh over all processes on the parameters' device type.
    Sparsify ``model`` before calling this (see module doc).

    ``masks="local"`` (default): each rank computes the masks of its own rows from its shard and
    FSDP2 gathers ``E * W`` (:mod:`nmsparse.training.fsdp_masks`); transposable masks and ``Conv1D``
    weights need rows per rank to be a multiple of m (checked, ValueError naming the layer).
    ``masks="gathered"``: every rank computes every whole mask from the gathered dense ``W``
    (no constraint on rows). On the CPU masks are computed from a copy (:func:`_on_private_copy`).
    All checks run before the model is changed.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nmsparse.training import fsdp_masks

    if masks not in ("local", "gathered"):
        raise ValueError(f"masks must be 'local' or 'gathered', got {masks!r}")
    _require_dist()
    if is_sharded(model):
        raise ValueError("model is already sharded (fully_shard modules or DTensor parameters); call shard() once, "
                         "on a model that nmsparse.sparsify has already made N:M")
    if mesh is None:
        p = next(model.parameters(), None)
        dev = p.device.type if p is not None else "cpu"
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard() takes a 1-D device mesh, got {mesh.ndim} dimensions")
    layers = [(full[: -len(t) - 1] if full != t else "", mod, t, p) for full, mod, t, p in sparse_tensors(model)]
    if masks == "local":
        fsdp_masks.check_local(layers, mesh.size())
        fsdp_masks.prepare(layers)
    for _, _, _, p in layers:  # either way masks are computed from FSDP2-managed storage
        if not isinstance(p.mask_fn, functools.partial) or p.mask_fn.func is not _on_private_copy:
            p.mask_fn = functools.partial(_on_private_copy, p.mask_fn)
    chosen = _default_units(model) if units is None else list(units)
    for mod in chosen:
        if mod is not model:
            fully_shard(mod, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if masks == "local":
        fsdp_masks.finish(layers, mesh)
        if not reshard_after_forward:
            for unit in [*chosen, model]:
                for mod in unit if isinstance(unit, list) else [unit]:
                    mod.register_forward_pre_hook(fsdp_masks.reshard_before_training_forward, prepend=True)
    return model


def _default_units(model: nn.Module) -> list:
    """One FSDP2 unit per N:M sparse layer; a weight shared by several modules (tied, made N:M with
    ``shared="sparsify"``) puts its owner and every user in one unit (a list), as FSDP2 requires."""
    from torch.nn.utils import parametrize

    users: dict[int, list[nn.Module]] = {}
    for mod in model.modules():
        if parametrize.is_parametrized(mod):
            for plist in mod.parametrizations.values():
                users.setdefault(id(plist.original), []).append(mod)
    units = []
    for _, mod, tname, _ in sparse_tensors(model):
        group = users.get(id(mod.parametrizations[tname].original), [mod])
        units.append(group[0] if len(group) == 1 else group)
    return units


def _on_private_copy(mask_fn: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """``mask_fn`` of a copy of a CPU ``weight``. nmsparse's CPU mask kernels read a weight through
    ``Tensor.numpy()``, which marks its storage non-resizable; FSDP2 frees an unsharded parameter
    after use by resizing its storage to 0, which then fails ("Trying to resize storage that is not
    resizable", in ``free_storage`` of torch/distributed/fsdp/_fully_shard/_fsdp_param.py)."""
    return mask_fn(weight.clone() if weight.device.type == "cpu" else weight)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def magnitude_masks(model: nn.Module, n: int, m: int, layout: str = "channels") -> dict[str, torch.Tensor]:
    """Like :func:`nmsparse.magnitude_masks` (for a dense model) on a sharded model: each selected
    weight is all-gathered (a collective: call on every rank), its N:M mask returned whole."""
    modules = dict(model.named_modules())
    return {e.param: layer_mask(_full(modules[e.name].weight).detach(), n, m, layout)
            for e in plan(model, n, m, layout=layout) if e.sparse}


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Broadcast ``src``'s buffers (BatchNorm running statistics) to every rank, as DDP does.

    FSDP2 leaves buffers alone, so statistics updated from each rank's own batches drift apart;
    training-mode forwards do not read them, so syncing before evaluation and checkpoints gives the
    running statistics a DDP run has. N:M masks and step counters are skipped (equal by construction;
    :func:`nmsparse.training.distributed.check_same` verifies them)."""
    skip = {id(b) for _, _, p in sparse_layers(model) for b in p.buffers()}
    for b in model.buffers():
        if id(b) not in skip:
            dist.broadcast(b.data, src=src)


# --- checkpoints ----------------------------------------------------------------------------------

def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from nmsparse.training.fsdp_masks import local_weight

    state = {"model": {k: local_weight(v) for k, v in get_model_state_dict(model).items()}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write model (dense weights, masks, mask steps) and optimizer shards into the new folder
    ``folder`` with ``torch.distributed.checkpoint`` (a collective: call on every rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(folder))
    dist.barrier()
    if dist.get_rank() == 0:  # every rank's shard is written: the checksum manifest of the whole folder
        sign_folder(folder)
    dist.barrier()


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and plain data only; anything else is refused."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
    }

    def find_class(self, module: str, name: str):
        if "." not in name and module in self._MODULES:
            # only the classes DCP defines there: never a function, nor a name reached through a
            # module they import (``metadata.os.system``)
            obj = getattr(sys.modules.get(module) or importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif "." not in name and (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                        torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's metadata")


def _safe_reader(folder: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                md = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if not isinstance(md, Metadata):
                raise ValueError(f"{folder}: .metadata does not hold DCP metadata")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(folder)


def _weights_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """Non-tensor items (the optimizer's hyperparameters) are read with ``weights_only=True``."""

        def load_bytes(self, read_item, value) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"checkpoint item {read_item.dest_index.fqn!r} is not plain data; refusing to "
                                 f"unpickle it ({str(e).splitlines()[0]})") from e
            safe = io.BytesIO()  # the parent class unpickles it again: give it the checked object
            torch.save(obj, safe)
            safe.seek(0)
            super().load_bytes(read_item, safe)

    return WeightsOnlyPlanner()


def read_dcp(state: dict, folder: str | Path, **kwargs) -> None:
    """``torch.distributed.checkpoint.load(state, ...)`` from ``folder`` without running code from it
    (see module doc); a failure on any rank is raised as one ValueError naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=_safe_reader(str(folder)), planner=_weights_only_planner(), **kwargs)
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) and f else getattr(f, "exc", f) for f in e.failures.values()]
        first = str(causes[0]).strip().splitlines()[0] if causes else str(e)
        raise ValueError(f"cannot load the checkpoint {folder}: {first}") from e


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what :func:`save_checkpoint` wrote into the sharded ``model`` (and ``optimizer``), in
    place; each rank reads its own shards (a collective: call on every rank). No code runs from the
    folder (see module doc). The shards are read into copies first: a damaged folder raises with the
    model and optimizer unchanged."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.utils._pytree import tree_map

    folder = str(folder)
    if not (Path(folder) / ".metadata").is_file():
        raise ValueError(f"{folder} is not a torch.distributed.checkpoint folder (no .metadata file)")
    _verify(folder)
    # get_*_state_dict hands out the model's own tensors, which dcp.load would fill in place
    state = tree_map(lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) else t, _state(model, optimizer))
    read_dcp(state, folder)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _verify(folder: str) -> None:
    """The folder's checksum manifest, checked on rank 0 (one reading of the files) before any rank
    reads a shard; a mismatch is one ``LoadError`` on every rank (a collective when distributed)."""
    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            verify_folder(folder)
        except LoadError as e:
            problem = [e.problem, e.hint]
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise LoadError(folder, problem[0], problem[1])


RUN_CHECKPOINTS = "checkpoint.dcp"


def save_run_checkpoint(out: str | Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Write a training run's model and optimizer after ``epoch`` into ``out/checkpoint.dcp/epoch-K``
    (a collective) and return that folder relative to ``out``. The run's ``checkpoint.pt``, written
    next, names it: a run killed before that still resumes from the previous epoch's folder."""
    rel = f"{RUN_CHECKPOINTS}/epoch-{epoch}"
    folder = Path(out) / rel
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)  # a leftover of a run killed mid-write
        folder.mkdir(parents=True)
    dist.barrier()
    save_checkpoint(folder, model, optimizer)
    return rel


def remove_old_run_checkpoints(out: str | Path, keep: str) -> None:
    """Delete the folders of ``out/checkpoint.dcp`` other than ``keep`` (call on rank 0 only)."""
    root = Path(out) / RUN_CHECKPOINTS
    for d in root.iterdir() if root.is_dir() else ():
        if f"{RUN_CHECKPOINTS}/{d.name}" != keep:
            shutil.rmtree(d, ignore_errors=True)


def load_run_checkpoint(out: str | Path, rel: object, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the folder ``rel`` that a run's ``checkpoint.pt`` names (see :func:`save_run_checkpoint`)."""
    if not (isinstance(rel, str) and re.fullmatch(rf"{re.escape(RUN_CHECKPOINTS)}/epoch-\d+", rel)):
        raise ValueError(f"{out}/checkpoint.pt names no FSDP checkpoint folder ({rel!r}); "
                         "was it written by 'nmsparse train --fsdp'?")
    load_checkpoint(Path(out) / rel, model, optimizer)


# --- whole model on rank 0 ------------------------------------------------------------------------

def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU on rank 0, ``{}`` on the other ranks (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from nmsparse.training.fsdp_masks import local_weight

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: local_weight(v) for k, v in full.items()}


def finalized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`full_state_dict`, finalized on rank 0: each sparse layer's ``<layer>.weight`` holds
    ``E * W`` and its N:M entries (dense weight, mask, step) are gone, as in
    ``nmsparse.finalize(model).state_dict()`` of an unsharded model. ``{}`` on other ranks."""
    layers = []
    for name, mod, _ in sparse_layers(model):
        plist = mod.parametrizations["weight"]
        if len(plist) != 1:
            raise ValueError(f"layer {name!r}: its weight has other parametrizations besides N:M; "
                             "finalized_state_dict handles N:M only")
        layers.append(f"{name}." if name else "")
    full = full_state_dict(model)
    if not full:
        return full
    for prefix in layers:
        p = f"{prefix}parametrizations.weight."
        dense = full.pop(p + "original")
        full[prefix + "weight"] = (dense * full.pop(p + "0.mask").to(dense.dtype)).contiguous()
        full.pop(p + "0.step", None)
    return full
