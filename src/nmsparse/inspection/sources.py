"""The tensors of each kind of file ``nmsparse inspect`` reads, one at a time and without running code.

Each reader yields ``(name, tensor, axis, note)``: ``axis`` is the reduction axis of a matmul or conv
weight (None for other tensors). Safetensors files are read tensor by tensor (``safe_open``), training
checkpoints with ``torch.load(weights_only=True)``, ONNX files with ``onnx.load`` (protobuf parsing).
Every failure is a :class:`~nmsparse.plumbing.errors.LoadError` (a ``FormatError`` for our own formats).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from nmsparse.plumbing import checksum
from nmsparse.plumbing.errors import LoadError
from nmsparse.integrations.compressed_tensors import bitmask
from nmsparse.integrations.compressed_tensors.folder import INDEX, SINGLE, Entry, file_header, read_tensor, weight_map

Item = tuple[str, torch.Tensor, "int | None", str]
# transformers models whose Conv1D stores (in, out): their weights reduce along dim 0
_CONV1D_MODELS = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_ORIGINAL, _MASK = ".parametrizations.weight.original", ".parametrizations.weight.0.mask"


def axis_of(name: str, t: torch.Tensor, conv1d: bool = False) -> int | None:
    """Reduction axis of a weight by its name and shape: dim 1 of a Linear ``(out, in)`` or conv
    ``(out, in, *k)``, dim 0 of a transformers Conv1D; None for 1-D tensors and embeddings."""
    if t.dim() < 2 or not (t.dtype.is_floating_point or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        return None
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in ("weight", "kernel") and not name.endswith("_weight"):
        return None
    if t.dim() == 2 and any(k in name for k in ("embed", "wte", "wpe", "position_embeddings", "token_type")):
        return None  # an embedding table (a conv such as ViT's patch_embeddings.projection is 3-D or more)
    return 0 if conv1d and t.dim() == 2 else 1


def _conv1d(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") in _CONV1D_MODELS
    except (OSError, ValueError, AttributeError):
        return False


def _entries(entries: dict[str, Entry], conv1d: bool) -> Iterator[Item]:
    for name in sorted(entries):
        t = read_tensor(entries[name], name)
        yield name, t, axis_of(name, t, conv1d), ""


def safetensors_file(path: Path) -> Iterator[Item]:
    yield from _entries(file_header(path), _conv1d(path.parent))


def hf_folder(path: Path) -> Iterator[Item]:
    yield from _entries(weight_map(path), _conv1d(path))


def compressed_tensors_folder(path: Path) -> Iterator[Item]:
    """sparse-24-bitmask weights decompressed (their stored dtype kept, FP8 included), the rest as stored."""
    entries = weight_map(path)
    mods = {k[: -len(".compressed")] for k in entries if k.endswith(".compressed")}
    parts = {f"{m}.{s}" for m in mods for s in bitmask.SUFFIXES}
    for name in sorted(set(entries) - parts | {f"{m}.weight" for m in mods}):
        mod = name[: -len(".weight")]
        if mod in mods:
            missing = [f"{mod}.{s}" for s in bitmask.SUFFIXES if f"{mod}.{s}" not in entries]
            if missing:
                raise LoadError(path, f"tensor {missing[0]!r} is missing: '{mod}.compressed' needs {mod}.bitmask "
                                      f"and {mod}.shape beside it")
            got = {s: read_tensor(entries[f"{mod}.{s}"], f"{mod}.{s}") for s in bitmask.SUFFIXES}
            try:
                t = bitmask.decompress24(got["compressed"], got["bitmask"], got["shape"], mod)
            except ValueError as e:
                raise LoadError(path, str(e)) from None
            yield name, t, 1, "sparse-24-bitmask"
        else:
            t = read_tensor(entries[name], name)
            yield name, t, axis_of(name, t), ""


def nmsparse_file(path: Path) -> Iterator[Item]:
    """An nmsparse compressed file: compressed weights decompressed, measured along their stored axis."""
    from safetensors import safe_open

    from nmsparse.export.compress import DTYPE_NAMES, NMCompressed, decompress
    from nmsparse.export.files import INDEX as NM_INDEX
    from nmsparse.export.files import VALUES, FormatError, read_header

    header = read_header(path)  # checks the header and, when the file has one, its checksum's record
    listed = {e["name"]: e for e in header["compressed"]}
    dtypes = {v: k for k, v in DTYPE_NAMES.items()}
    with safe_open(str(path), framework="pt") as f:
        record = checksum.recorded(path, f.metadata() or {})

        def get(key: str) -> torch.Tensor:  # every tensor checked against the file's checksum as it is read
            t = f.get_tensor(key)
            if record is not None:
                record.check(key, t)
            return t

        keys = sorted(f.keys())
        for key in keys:
            if key.endswith(VALUES) or key.endswith(NM_INDEX):
                continue
            yield key, get(key), axis_of(key, f.get_slice(key)[:0]), ""
        for name, e in sorted(listed.items()):
            try:
                c = NMCompressed(get(name + VALUES), get(name + NM_INDEX), header["n"],
                                 header["m"], e["dim"], tuple(e["view"]), dtypes[e["dtype"]])
                dense = decompress(c)
            except Exception as err:  # noqa: BLE001 - a damaged or missing tensor of the file
                raise FormatError(f"{path}: compressed tensor {name!r}: {err}", path=path) from None
            yield name, dense.reshape(e["view"]), e["dim"], f"stored {header['n']}:{header['m']}"


def checkpoint_file(path: Path) -> Iterator[Item]:
    """A torch.save training checkpoint (tensors and plain data only): its model state dict, with
    nmsparse's parametrized weights shown as the weight the model computes with (``original * mask``)."""
    from nmsparse.plumbing.io import read_torch

    obj = read_torch(path)
    state = _state_dict(obj)
    if state is None:
        raise LoadError(path, "holds no state dict of tensors (looked at the top level and at 'model', "
                              "'state_dict', 'model_state_dict')")
    for key in sorted(state):
        if key.endswith(_MASK) or key.endswith(".parametrizations.weight.0.step"):
            continue
        t = state[key]
        if key.endswith(_ORIGINAL):
            mod = key[: -len(_ORIGINAL)]
            mask = state.get(mod + _MASK)
            t = t * mask if isinstance(mask, torch.Tensor) and mask.shape == t.shape else t
            key = f"{mod}.weight"
        yield key, t, axis_of(key, t), ""


def _state_dict(obj: object) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
        for k in ("model", "state_dict", "model_state_dict"):
            found = _state_dict(obj.get(k))
            if found:
                return found
    return None


def onnx_file(path: Path) -> Iterator[Item]:
    """Initializers of an ONNX model; the axis is the one its consuming MatMul/Gemm/Conv reduces over."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise LoadError(path, "reading ONNX needs the onnx package (pip install 'nmsparse[onnx]')") from None
    from nmsparse.export.onnx_check import _reduction_uses, _to_torch

    try:  # the graph only: external data is read one initializer at a time below
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and others
        raise LoadError(path, f"is not a readable ONNX model ({type(e).__name__})") from None
    uses = _reduction_uses(model.graph)
    for init in sorted(model.graph.initializer, key=lambda i: i.name):
        try:
            t = _to_torch(numpy_helper.to_array(init, base_dir=str(path.parent)))
        except Exception as e:  # noqa: BLE001 - missing external data, bad raw bytes, a dtype torch lacks
            raise LoadError(path, f"initializer {init.name!r} cannot be read ({type(e).__name__}: {e})") from None
        axes = [a for _, a, _ in uses.get(init.name, []) if a is not None]
        yield init.name, t, (axes[0] if axes and t.dim() >= 2 else None), uses[init.name][0][0] if axes else ""


def detect(path: Path) -> str:
    """Which reader fits ``path`` (``LoadError`` naming it when none does)."""
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                qc = json.loads(cfg.read_text()).get("quantization_config") or {}
            except (OSError, ValueError, AttributeError):
                raise LoadError(cfg, "is not readable JSON") from None
            if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
                return "compressed-tensors"
        if (path / SINGLE).is_file() or (path / INDEX).is_file():
            return "hf-folder"
        files = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".pt", ".onnx"))
        more = ", ..." if len(files) > 4 else ""
        hint = f" (it holds {', '.join(files[:4])}{more}: inspect one of those)" if files else ""
        raise LoadError(path, f"is a folder without {SINGLE} or {INDEX}: not a Hugging Face model folder{hint}")
    if not path.exists():
        raise LoadError(path, "not found")
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise LoadError(path, f"cannot be read ({e.strerror})") from None
    if not head:
        raise LoadError(path, "is empty (0 bytes)")
    if path.suffix == ".onnx":
        return "onnx"
    if head[:2] == b"PK":
        return "checkpoint"
    if len(head) >= 9 and head[8:9] == b"{":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - a damaged file: its reader says how
            return "safetensors"
        return "nmsparse-compressed" if meta.get("format") == "nmsparse-nm" else "safetensors"
    raise LoadError(path, "is not a file nmsparse inspect knows (safetensors, nmsparse compressed file, torch.save "
                          "checkpoint, .onnx, or a Hugging Face / compressed-tensors folder)")


READERS = {"safetensors": safetensors_file, "hf-folder": hf_folder, "compressed-tensors": compressed_tensors_folder,
           "nmsparse-compressed": nmsparse_file, "checkpoint": checkpoint_file, "onnx": onnx_file}
