"""Write a finalized 2:4 ``transformers`` model as a compressed-tensors ``sparse-24-bitmask`` folder.

The folder is what compressed-tensors 0.14's ``ModelCompressor`` writes for an unquantized 2:4 model:
``config.json`` (the model's config plus the ``quantization_config`` of
:func:`~nmsparse.integrations.compressed_tensors.scheme.sparsity_entry`: targets ``["Linear"]``, the
Linear layers left dense in ``ignore``) and ``model.safetensors`` (or shards and
``model.safetensors.index.json``) in which every 2:4 Linear weight is replaced by its
``.compressed`` / ``.bitmask`` / ``.shape`` tensors. Files are written in a temporary folder and moved
into place at the end: nothing is half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse.plumbing.errors import WriteError
from nmsparse.integrations.compressed_tensors import bitmask
from nmsparse.integrations.compressed_tensors.folder import INDEX, SINGLE
from nmsparse.integrations.compressed_tensors.scheme import sparsity_entry
from nmsparse.plumbing.writing import save_safetensors, staging_dir, write_error

MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class SaveReport:
    """What :func:`save` wrote: ``compressed`` (module names), ``dense`` (module name -> reason the
    Linear layer was left dense), ``files`` (names in ``folder``), ``nbytes`` (weight bytes written)
    and ``dense_nbytes`` (what the same tensors take dense)."""

    folder: str
    compressed: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    nbytes: int = 0
    dense_nbytes: int = 0

    def summary(self) -> str:
        """One line: layers compressed, layers dense, bytes against dense."""
        return (f"{self.folder}: {len(self.compressed)} Linear layer(s) stored 2:4 (sparse-24-bitmask), "
                f"{len(self.dense)} dense; weights {self.nbytes / 1e6:.2f} MB (dense {self.dense_nbytes / 1e6:.2f} MB)")


def _reason(name: str, mod: nn.Linear, shared: set[int]) -> str | None:
    w = mod.weight
    if id(w) in shared:
        return "weight tied to another module"
    if w.shape[1] % 4:
        return f"{w.shape[1]} input features, not a multiple of 4"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return None  # decided by the caller (a dtype problem of the whole model)
    groups = (w.detach() != 0).reshape(w.shape[0], -1, 4).sum(-1)
    over = int((groups > 2).sum())
    return f"not 2:4 ({over} groups of 4 inputs hold more than 2 non-zeros)" if over else None


def save(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> SaveReport:
    """Write ``model`` (a finalized ``transformers`` model in bf16 or fp16) to ``folder`` in
    compressed-tensors' ``sparse-24-bitmask`` format; every ``nn.Linear`` whose weight is 2:4 along its
    input features (2 kept per 4) is compressed, every other tensor stored as it is. Shards above
    ``max_shard_bytes`` (with an index). Returns the :class:`SaveReport` (layers left dense, with reasons).

    Raises ``ValueError`` (nothing written) when the model still has nmsparse parametrizations (call
    :func:`nmsparse.finalize` first), has no config, is float32 where a 2:4 layer would be stored, has
    no 2:4 Linear layer, or when ``folder`` holds files and ``overwrite`` is False."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ValueError(f"save needs a transformers model (with .config), got {type(model).__name__}")
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            raise ValueError(f"layer {name!r} still has N:M parametrizations: call nmsparse.finalize(model) first, "
                             "so that the weights hold the zeros")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} is not empty; pass overwrite=True to replace its files")
    report = SaveReport(str(folder))
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    shared = {i for i, k in uses.items() if k > 1}  # tied weights
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, mod in linears:
        why = _reason(name, mod, shared)
        if why is None and mod.weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"layer {name!r} is {mod.weight.dtype}: sparse-24-bitmask readers (vLLM's 2:4 kernels) "
                             "take bfloat16 or float16 weights; convert first, e.g. model.to(torch.bfloat16)")
        if why is None:
            report.compressed.append(name)
        else:
            report.dense[name] = why
    for name, mod in model.named_modules():  # weight layers the format cannot store compressed
        if type(mod).__name__ == "Conv1D" and getattr(getattr(mod, "weight", None), "dim", lambda: 0)() == 2:
            report.dense[name] = ("transformers Conv1D (weight stored (in, out)), not nn.Linear: sparse-24-bitmask "
                                  "readers compress Linear layers only")
    if not report.compressed:
        raise ValueError(f"{type(model).__name__} has no Linear layer whose weight is 2:4 along its input features "
                         f"({'; '.join(f'{k}: {v}' for k, v in list(report.dense.items())[:3])}); prune or "
                         "finalize it first")
    tensors = _tensors(model, set(report.compressed), report)
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p.detach() == 0).sum()) for p in model.parameters())
    config = model.config.to_dict()
    dtype = str(model.get_submodule(report.compressed[0]).weight.dtype).replace("torch.", "")
    config["dtype"] = dtype  # the stored weights' dtype, which readers build the model in
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it: vLLM picks the class by it
    _compat(config)
    ignore = sorted(k for k in report.dense if isinstance(model.get_submodule(k), nn.Linear))  # targets: Linear
    config["quantization_config"] = sparsity_entry(ignore, round(zeros / max(total, 1), 4))
    created = not folder.exists()
    tmp = staging_dir(folder)  # inside folder: a killed save leaves nothing beside it (the next one cleans up)
    try:
        files = _write_shards(tensors, tmp, max_shard_bytes)
        _write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        for stale in [SINGLE, INDEX, *(p.name for p in folder.glob("model-*-of-*.safetensors"))]:
            if (folder / stale).exists() and stale not in files:
                (folder / stale).unlink()  # weights of an earlier save that would mix with these
        for f in sorted(p.name for p in tmp.iterdir()):
            os.replace(tmp / f, folder / f)
    except WriteError as e:  # it names the staging folder's file: show the user's path instead
        shown = folder / Path(e.path).name if tmp in Path(e.path).parents else e.path
        raise WriteError(shown, e.cause, e.errno) from e
    except OSError as e:
        raise write_error(folder, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
    report.files = ["config.json"] + files
    return report


def _tensors(model: nn.Module, compressed: set[str], report: SaveReport) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    storages: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied second name: save_pretrained stores the tensor once
            continue
        seen.add(id(t))
        mod, _, leaf = key.rpartition(".")
        t = t.detach().cpu().contiguous()
        report.dense_nbytes += t.numel() * t.element_size()
        if leaf == "weight" and mod in compressed:
            parts = bitmask.compress24(t)
            for s, v in parts.items():
                out[f"{mod}.{s}"] = v
                report.nbytes += v.numel() * v.element_size()
        else:
            store = t.untyped_storage()
            whole = t.storage_offset() == 0 and store.nbytes() == t.numel() * t.element_size()
            # no copy of the model's tensors: only a view, or a second tensor on one storage, is copied
            out[key] = t if whole and store.data_ptr() not in storages else t.clone()
            storages.add(store.data_ptr())
            report.nbytes += t.numel() * t.element_size()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], tmp: Path, max_bytes: int) -> list[str]:
    from nmsparse.plumbing.version import __version__

    meta = {"format": "pt", "nmsparse_version": __version__}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nb > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nb
    if len(shards) == 1:
        save_safetensors(tmp / SINGLE, shards[0], meta)  # with nmsparse's checksum (old readers ignore it)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    wm = {}
    for name, shard in zip(names, shards):
        save_safetensors(tmp / name, shard, meta)
        wm.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_text(tmp / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))},
                                        indent=2) + "\n")
    return names + [INDEX]


def _compat(config: dict) -> None:
    """Keys transformers 4.x reads (transformers 5 moved rope settings into ``rope_parameters``)."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in config:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            config["rope_scaling"] = dict(rope)
    config["torch_dtype"] = config["dtype"]


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise write_error(path, e) from e
