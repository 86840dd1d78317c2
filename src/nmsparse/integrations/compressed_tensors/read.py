"""Load a compressed-tensors ``sparse-24-bitmask`` folder as a plain ``transformers`` model.

The model is built as a skeleton on the ``meta`` device (no memory); every file is checked from its
header before any data is read; then the weights are read module by module in shard order, each 2:4
weight decompressed (and FP8 weights dequantized) to dense-with-zeros, and assigned to the skeleton.
Any problem raises one :class:`~nmsparse.export.FormatError` naming the tensor, and no model is returned.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmsparse.export.files import FormatError
from nmsparse.integrations.compressed_tensors import bitmask
from nmsparse.integrations.compressed_tensors.folder import Entry, fail, read_tensor, weight_map
from nmsparse.integrations.compressed_tensors.scheme import Scheme, parse
from nmsparse.masking.nm import is_nm
from nmsparse.calibration.streaming import build_model

QPARAMS = ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point")
_FLOAT_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_scheme(folder: Path) -> tuple[dict, Scheme]:
    """``(config.json as a dict, its parsed Scheme)``; ``FormatError`` for a folder we cannot read."""
    cfg_path = folder / "config.json"
    if not folder.exists():
        raise fail(folder, "not found")
    if not folder.is_dir():
        raise fail(folder, "is a file: give the model folder (config.json and its safetensors files)")
    if not cfg_path.is_file():
        raise fail(folder, "has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise fail(cfg_path, f"is not readable JSON ({e})") from None
    try:
        return cfg, parse(cfg.get("quantization_config") if isinstance(cfg, dict) else None)
    except ValueError as e:
        raise fail(cfg_path, str(e)) from None


def load(folder: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """The ``transformers`` model (``model_class``, default ``AutoModelForCausalLM``) stored in the
    compressed-tensors ``sparse-24-bitmask`` folder ``folder``, in eval mode, with plain dense weights
    that hold the zeros: every compressed weight is 2:4 along its input features (N = 2 kept per 4).

    FP8 weights (per-tensor or per-channel scales) are dequantized to the model's dtype exactly as
    compressed-tensors 0.14 does, with a ``UserWarning`` saying so (activation quantization is not
    applied: the model computes in its dtype). Unsupported schemes, and any inconsistent, truncated or
    missing tensor, raise :class:`~nmsparse.export.FormatError` naming it; nothing is returned then.
    Sharded folders (``model.safetensors.index.json``) are read shard by shard."""
    folder = Path(folder)
    cfg, scheme = read_scheme(folder)
    entries = weight_map(folder)
    model = _skeleton(folder, cfg, model_class)
    try:
        plan = _plan(folder, model, scheme, entries)
    except FormatError as e:  # often the wrong model class for the folder: say which class it records
        archs = cfg.get("architectures")
        if isinstance(archs, list) and archs and type(model).__name__ not in archs:
            raise FormatError(f"{e} (config.json records architectures {archs}: pass model_class="
                              f"transformers.{archs[0]})", path=e.path) from None
        raise
    new = _read(folder, model, plan, entries)
    _assign(folder, model, new)
    if plan["fp8"]:
        acts = sorted({g["activations"] for g in scheme.fp8_groups})
        warnings.warn(f"{folder}: FP8 weights of {len(plan['fp8'])} layer(s) dequantized to {_dtype_of(model)} "
                      f"(scales per {'/'.join(sorted(set(plan['fp8'].values())))}); their activation quantization "
                      f"({', '.join(acts)}) is not applied: the model computes in {_dtype_of(model)}", stacklevel=2)
    return model.eval()


def _dtype_of(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "its dtype"


def _skeleton(folder: Path, cfg: dict, model_class: Any) -> nn.Module:
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        raise fail(folder, "loading a compressed-tensors folder needs transformers (pip install 'nmsparse[hf]')") \
            from None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise fail(folder / "config.json", f"transformers cannot read it ({str(e).splitlines()[0]})") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # decompressed here: the model itself is a plain one
    dtype = _FLOAT_NAMES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), None)
    cls = model_class if model_class is not None else transformers.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = build_model(cls, config)
    except Exception as e:  # noqa: BLE001
        raise fail(folder, f"{getattr(cls, '__name__', cls)} cannot be built from its config.json "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.to(dtype) if dtype is not None else model


def _plan(folder: Path, model: nn.Module, scheme: Scheme, entries: dict[str, Entry]) -> dict:
    """Which stored tensors make which model tensor; every check that needs headers only."""
    state = model.state_dict()
    modules = dict(model.named_modules())
    used: set[str] = set()
    compressed: dict[str, str] = {}  # module name -> weight key
    fp8: dict[str, str] = {}  # module name -> scale strategy
    for key in sorted(k for k in entries if k.endswith(".compressed")):
        mod = key[: -len(".compressed")]
        parts = {s: f"{mod}.{s}" for s in bitmask.SUFFIXES}
        for s, k in parts.items():
            if k not in entries:
                raise fail(folder, f"tensor {k!r} is missing: {key!r} needs {mod}.bitmask and {mod}.shape beside it")
        wkey = f"{mod}.weight"
        if wkey not in state or not isinstance(modules.get(mod), nn.Linear):
            raise fail(folder, f"tensor {key!r} is a compressed weight of {mod!r}, which is not a Linear layer of "
                               f"{type(model).__name__}")
        rows, cols = state[wkey].shape
        c, b = entries[parts["compressed"]], entries[parts["bitmask"]]
        try:
            if cols % 4:
                raise ValueError(f"{mod} has {cols} input features, not a multiple of 4")
            bitmask.check_parts(mod, c.shape, c.dtype, b.shape, b.dtype, rows, cols)
        except ValueError as e:
            raise fail(folder, str(e)) from None
        if entries[parts["shape"]].shape not in ((2, 1), (2,)):
            raise fail(folder, f"tensor {parts['shape']!r} has shape {entries[parts['shape']].shape}, expected (2, 1)")
        used |= set(parts.values())
        compressed[mod] = wkey
    for mod, module in modules.items():
        wkey = f"{mod}.weight"
        group = scheme.fp8_group(mod, module) if isinstance(module, nn.Linear) else None
        stored = entries.get(f"{mod}.compressed") or entries.get(wkey)
        if group is None or stored is None:
            continue
        if stored.dtype != bitmask.FP8:
            raise fail(folder, f"group {group['name']!r} quantizes {mod!r} to FP8, but its weight is stored as "
                               f"{stored.dtype}")
        scale = entries.get(f"{mod}.weight_scale")
        rows = state[wkey].shape[0]
        want = [(rows, 1)] if group["strategy"] == "channel" else [(1,), (), (1, 1)]
        if scale is None or scale.shape not in want:
            got = "missing" if scale is None else f"shape {scale.shape}"
            raise fail(folder, f"tensor '{mod}.weight_scale' is {got}; FP8 {group['strategy']} scales of {mod!r} "
                               f"need shape {want[0]}")
        fp8[mod] = group["strategy"]
        used |= {f"{mod}.{q}" for q in QPARAMS if f"{mod}.{q}" in entries}
    for mod in compressed:
        if entries[f"{mod}.compressed"].dtype == bitmask.FP8 and mod not in fp8:
            raise fail(folder, f"tensor '{mod}.compressed' holds FP8 values, but no quantization group of "
                               "config.json covers the layer")
    dense = [k for k in state if k not in set(compressed.values())]
    tied = _tied(model)
    for k in dense:
        if k in entries:
            if entries[k].shape != tuple(state[k].shape):
                raise fail(folder, f"tensor {k!r} has shape {entries[k].shape} in the folder, "
                                   f"{tuple(state[k].shape)} in {type(model).__name__}")
            used.add(k)
        elif k not in tied:
            raise fail(folder, f"tensor {k!r} of {type(model).__name__} is missing from the folder")
    extra = sorted(set(entries) - used)
    if extra:
        raise fail(folder, f"the folder holds tensor {extra[0]!r} ({len(extra)} in all), which "
                           f"{type(model).__name__} has no place for")
    targets = [f"{m}.weight" for m, mod in modules.items()
               if isinstance(mod, nn.Linear) and scheme.is_target(m, mod) and m not in compressed]
    return {"compressed": compressed, "fp8": fp8, "dense": [k for k in dense if k in entries],
            "check_24": set(targets)}


def _tied(model: nn.Module) -> set[str]:
    """State-dict names that are a second name of a tensor listed earlier (tied weights)."""
    seen, out = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            out.add(k)
        seen[id(v)] = k
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict):
        out |= set(keys)
    elif isinstance(keys, (list, tuple)) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        out |= set(keys)
    return out


def _read(folder: Path, model: nn.Module, plan: dict, entries: dict[str, Entry]) -> dict[str, torch.Tensor]:
    """Every model tensor from the files, module by module in shard order (dense, the model's dtype)."""
    state = model.state_dict()
    jobs = [(str(entries[f"{m}.compressed"].file), m) for m in plan["compressed"]]
    jobs += [(str(entries[k].file), k) for k in plan["dense"]]
    new: dict[str, torch.Tensor] = {}
    for _, name in sorted(jobs):
        if name in plan["compressed"]:
            parts = {s: read_tensor(entries[f"{name}.{s}"], f"{name}.{s}") for s in bitmask.SUFFIXES}
            try:
                w = bitmask.decompress24(parts["compressed"], parts["bitmask"], parts["shape"], name)
            except ValueError as e:
                raise fail(folder, str(e)) from None
            key = f"{name}.weight"
            if w.shape != state[key].shape:
                raise fail(folder, f"tensor '{name}.shape' says {list(w.shape)}, but {key!r} of "
                                   f"{type(model).__name__} is {list(state[key].shape)}")
        else:
            key, w = name, read_tensor(entries[name], name)
        mod = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and mod in plan["fp8"]:
            w = _dequantize(folder, mod, w, entries)
        if key in plan["check_24"] and not is_nm(w, 2, 4, dim=1):
            raise fail(folder, f"config.json says {mod!r} is 2:4 (sparsity_config targets), but its weight "
                               f"{key!r} has groups of 4 inputs with more than 2 non-zeros")
        new[key] = w.to(state[key].dtype) if w.dtype != state[key].dtype else w
    return new


def _dequantize(folder: Path, mod: str, w: torch.Tensor, entries: dict[str, Entry]) -> torch.Tensor:
    """compressed-tensors' dequantization: ``(w.to(scale.dtype) - zero_point) * scale``."""
    scale = read_tensor(entries[f"{mod}.weight_scale"], f"{mod}.weight_scale")
    if not scale.dtype.is_floating_point:
        raise fail(folder, f"tensor '{mod}.weight_scale' has dtype {scale.dtype}, expected a float dtype")
    x = w.to(scale.dtype)
    zp_key = f"{mod}.weight_zero_point"
    if zp_key in entries:
        x = x - read_tensor(entries[zp_key], zp_key).to(scale.dtype)
    return x * scale


def _assign(folder: Path, model: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Put the tensors into the meta skeleton, tie weights, rebuild non-persistent buffers."""
    model.load_state_dict(new, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    owners = sorted({name.rpartition(".")[0] for name, b in model.named_buffers() if b.is_meta})
    donor = None
    for owner in owners:
        mod = model.get_submodule(owner)
        fresh = _rebuilt(mod, model.config)
        if fresh is None:  # the module cannot be built alone: take it from a block-less shell
            donor = donor if donor is not None else _donor(model)
            try:
                fresh = donor.get_submodule(owner)
            except AttributeError:
                fresh = None
        for leaf, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                got = None if fresh is None else fresh._buffers.get(leaf)
                if got is None or got.is_meta or got.shape != b.shape:
                    raise fail(folder, f"buffer '{owner}.{leaf}' of {type(model).__name__} is not stored in "
                                       "checkpoints and cannot be rebuilt here")
                mod._buffers[leaf] = got  # dtype as computed (rotary frequencies stay float32)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise fail(folder, f"tensor {left[0]!r} of {type(model).__name__} was not loaded ({len(left)} in all)")


def _rebuilt(mod: nn.Module, config: Any) -> nn.Module | None:
    """A fresh CPU copy of a buffer-holding module (e.g. a rotary embedding, built from its config),
    or None when its constructor takes something else."""
    if any(True for _ in mod.parameters(recurse=False)) or list(mod.children()):
        return None
    cfg = getattr(mod, "config", None) or config
    try:
        with torch.device("cpu"):
            return type(mod)(config=cfg)
    except Exception:  # noqa: BLE001 - any other constructor signature
        return None


def _donor(model: nn.Module) -> nn.Module:
    """The model's shell (no blocks) built on the CPU, whose non-persistent buffers (e.g. rotary
    frequencies) are computed from the config as usual."""
    config = copy.deepcopy(model.config)
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = 0
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = []
    with torch.device("cpu"):
        return build_model(type(model), config)
