"""One safetensors file per model: every N:M layer weight compressed, every other tensor as it is.

The format is specified in ``docs/format.md`` (tensor names, metadata keys, bit packing, validation).
Loading reads only the safetensors header (JSON) and raw tensor bytes: no code from the file runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmsparse.plumbing import checksum
from nmsparse.plumbing.errors import LoadError
from nmsparse.export.compress import DTYPE_NAMES, NMCompressed, compress, decompress, index_nbytes, values_shape
from nmsparse.export.report import ExportReport, TensorEntry
from nmsparse.masking.layout import check_layout, reduction_dim, target_kind
from nmsparse.masking.nm import check_nm
from nmsparse.plumbing.writing import save_safetensors

FORMAT = "nmsparse-nm"
FORMAT_VERSION = 1
VALUES, INDEX = "::nm_values", "::nm_index"
DETECT_M = (2, 4, 8, 16)


class FormatError(LoadError):
    """A compressed file that is unreadable, inconsistent, or does not fit the model.

    A :class:`nmsparse.plumbing.errors.LoadError` (hence a ``ValueError``), so ``except LoadError`` catches every
    file nmsparse cannot load. ``str(error)`` is ``message`` as raised (it names the file); ``path`` is
    the file and ``problem`` the message without the file name in front."""

    def __init__(self, message: str, *, path: str | os.PathLike = "") -> None:
        path = str(path)
        problem = message
        for lead in (f"{path}: ", f"{path} "):
            if path and problem.startswith(lead):
                problem = problem[len(lead):]
                break
        self.path, self.problem, self.hint, self.action = path, problem, None, "cannot load"
        ValueError.__init__(self, message)  # the message as written, not LoadError's "cannot load PATH: ..."

    def with_hint(self, hint: str | None, *, action: str | None = None) -> "FormatError":
        """The same error with ``hint`` appended (``action`` is ignored: the message says what failed)."""
        return FormatError(f"{self}; {hint}" if hint else str(self), path=self.path)


def group_axis(module: nn.Module, layout: str = "channels") -> tuple[tuple[int, ...], int] | None:
    """``(view shape, dim)`` of ``module.weight`` along which its N:M groups run, or None when the
    module is not a Linear, Conv1d/2d/3d or transformers ``Conv1D``.

    Linear ``(out, in)``: groups along dim 1. Convolutions ``(out, in/groups, *k)``: dim 1 of the
    weight in ``layout="channels"``, dim 1 of the ``(out, in/groups * prod(k))`` view in ``"flat"``.
    transformers' ``Conv1D`` stores ``(in, out)``: groups along dim 0.
    """
    check_layout(layout)
    w = getattr(module, "weight", None)
    kind = target_kind(module, "weight")  # the core's one classification of layer weights
    if kind is None or not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    shape = tuple(w.shape)
    if kind == "conv" and layout == "flat":
        return (shape[0], math.prod(shape[1:])), 1
    return shape, reduction_dim(module, "weight")


def _layer_weights(model: nn.Module, layout: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """State-dict key of every layer weight -> (view shape, dim) of its N:M groups."""
    out = {}
    for name, mod in model.named_modules():
        axis = group_axis(mod, layout)
        if axis is not None:
            out[f"{name}.weight" if name else "weight"] = axis
    return out


def nm_layer_weights(model: nn.Module, n: int, m: int, layout: str = "channels") -> list[str]:
    """State-dict keys of the layer weights :func:`save_compressed` would store compressed at ``n``:``m``
    (float, reduction axis a multiple of ``m``, at most ``n`` non-zeros in every group)."""
    n, m = check_nm(n, m)
    state = model.state_dict()
    out = []
    for key, (view, dim) in _layer_weights(model, check_layout(layout)).items():
        w = state[key]
        if w.dtype not in DTYPE_NAMES or view[dim] % m:
            continue
        x = (w.detach().reshape(view) != 0).movedim(dim, -1)
        if w.numel() == 0 or int(x.reshape(-1, m).sum(-1).max()) <= n:
            out.append(key)
    return out


def detect_nm(model: nn.Module, layout: str = "channels") -> tuple[int, int]:
    """The N:M (m in 2, 4, 8, 16) that stores the model's layer weights in the fewest bytes
    (layers that are not N:M count as dense). ``(2, 4)`` when no layer is N:M for any of them."""
    check_layout(layout)
    state = model.state_dict()
    maxima: list[tuple[int, int, dict[int, int]]] = []  # (numel, element size, {m: max non-zeros per group})
    for key, (view, dim) in _layer_weights(model, layout).items():
        w = state[key]
        if w.dtype not in DTYPE_NAMES or w.numel() == 0:
            continue
        x = (w.detach().reshape(view) != 0).movedim(dim, -1)
        per_m = {m: int(x.reshape(-1, m).sum(-1).max()) for m in DETECT_M if view[dim] % m == 0}
        maxima.append((w.numel(), w.element_size(), per_m))
    best, best_cost = (2, 4), None
    for m in DETECT_M:
        for n in range(1, m):
            cost, fits = 0, False
            for numel, size, per_m in maxima:
                if per_m.get(m, m) <= n:
                    cost += numel * n // m * size + index_nbytes(numel // m, n, m)
                    fits = True
                else:
                    cost += numel * size
            if fits and (best_cost is None or cost < best_cost):
                best, best_cost = (n, m), cost
    return best


def save_compressed(model: nn.Module, path: str | os.PathLike, n: int | None = None, m: int | None = None,
                    layout: str = "channels") -> ExportReport:
    """Write ``model``'s state dict to one safetensors file at ``path`` (atomically), every layer
    weight that is N:M along its reduction axis (see :func:`group_axis`) compressed, every other
    tensor (biases, buffers, weights that are not N:M) as it is. ``n``/``m`` (N kept per M):
    both given, or both None to pick them with :func:`detect_nm`. Returns the report of what was
    stored how; layer weights stored dense are listed with their reason.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"save_compressed needs an nn.Module, got {type(model).__name__}")
    check_layout(layout)
    if (n is None) != (m is None):
        raise ValueError(f"give both n and m (N kept per group of M) or neither (to detect them), got n={n}, m={m}")
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            raise ValueError(f"layer {name!r} still has N:M parametrizations; call nmsparse.finalize(model) first")
    pattern = check_nm(*detect_nm(model, layout)) if n is None else check_nm(n, m)
    n, m = pattern
    state = model.state_dict()
    for key in state:
        if "::" in key:
            raise ValueError(f"tensor name {key!r} contains '::', which this format reserves")
    layers = _layer_weights(model, layout)
    tensors: dict[str, torch.Tensor] = {}
    listed, dense_layers, entries = [], [], []
    for key, t in state.items():
        t = t.detach()
        size = t.numel() * t.element_size()
        entry = TensorEntry(key, tuple(t.shape), str(t.dtype).replace("torch.", ""), size, size, layer=key in layers)
        if key in layers:
            view, dim = layers[key]
            c = None
            if t.dtype not in DTYPE_NAMES:
                entry.reason = f"dtype {t.dtype} is not a float type"
            elif view[dim] % m:
                entry.reason = f"reduction axis size {view[dim]} is not a multiple of m={m}"
            else:
                try:
                    c = compress(t.reshape(view), pattern, dim=dim)
                except ValueError as e:
                    where = re.search(r"w\[[^\]]*\]", str(e))
                    entry.reason = f"not {n}:{m} (first bad group {where.group(0) if where else '?'})"
            if c is not None:
                tensors[key + VALUES] = c.values.cpu()
                tensors[key + INDEX] = c.index.cpu()
                listed.append({"name": key, "shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype],
                               "view": list(view), "dim": dim})
                entry.stored_as, entry.stored_bytes = f"{n}:{m}", c.nbytes
            if entry.stored_as == "dense":
                dense_layers.append({"name": key, "reason": entry.reason})
        if entry.stored_as == "dense":
            tensors[key] = t.cpu().contiguous().clone()
        entries.append(entry)
    from nmsparse.plumbing.version import __version__

    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "nmsparse_version": __version__,
            "n": str(n), "m": str(m), "layout": layout, "compressed": json.dumps(listed),
            "dense_layers": json.dumps(dense_layers)}
    _atomic_save(tensors, meta, Path(path))
    return ExportReport(str(path), "nmsparse", n, m, layout, entries, file_bytes=os.path.getsize(path))


def dense_report(model: nn.Module, path: str | os.PathLike, n: int, m: int, layout: str = "channels") -> ExportReport:
    """Report of a plain (dense) state-dict file at ``path``: every tensor stored as it is."""
    layers = _layer_weights(model, layout)
    entries = []
    for key, t in model.state_dict().items():
        size = t.numel() * t.element_size()
        entries.append(TensorEntry(key, tuple(t.shape), str(t.dtype).replace("torch.", ""), size, size,
                                   layer=key in layers, reason="dense format" if key in layers else ""))
    return ExportReport(str(path), "dense", n, m, layout, entries, file_bytes=os.path.getsize(path))


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Write ``tensors`` with ``meta`` and its checksum to ``path`` whole or not at all (a failed write
    raises :class:`~nmsparse.plumbing.errors.WriteError` naming ``path``)."""
    save_safetensors(path, tensors, meta)


def read_header(path: str | os.PathLike) -> dict:
    """The parsed metadata of an nmsparse compressed file: ``n``, ``m``, ``layout``, ``version``,
    ``compressed`` (list of dicts), ``dense_layers``. Raises :class:`FormatError` if it is malformed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise FormatError(f"{path} is not a readable safetensors file: {e}", path=path) from None
    rec = _record(meta, path)
    if rec is not None:
        _verified(lambda: rec.check_metadata(meta), path)
    return _parse_meta(meta, path)


def _record(meta: dict, path) -> "checksum.Record | None":
    return _verified(lambda: checksum.recorded(path, meta), path)


def _verified(check, path):
    """``check()``, its ``LoadError`` raised as a :class:`FormatError` (one message naming the file)."""
    try:
        return check()
    except FormatError:
        raise
    except LoadError as e:
        raise FormatError(str(e), path=path) from None


def _parse_meta(meta: dict, path) -> dict:
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path} is not an nmsparse compressed file (metadata 'format' is "
                          f"{meta.get('format')!r}, expected {FORMAT!r})", path=path)
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise FormatError(f"{path}: metadata 'format_version' {meta.get('format_version')!r} is not an integer",
                          path=path) from None
    if version != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {version}; this nmsparse reads version {FORMAT_VERSION}",
                          path=path)
    try:
        n, m = int(meta["n"]), int(meta["m"])
        n, m = check_nm(n, m)
        layout = check_layout(meta["layout"])
        listed = json.loads(meta["compressed"])
        dense_layers = json.loads(meta.get("dense_layers", "[]"))
    except (KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{path}: bad metadata: {type(e).__name__}: {e}", path=path) from None
    if not isinstance(listed, list):
        raise FormatError(f"{path}: metadata 'compressed' must be a JSON list", path=path)
    seen = set()
    for i, e in enumerate(listed):
        ok = (isinstance(e, dict) and set(e) == {"name", "shape", "dtype", "view", "dim"}
              and isinstance(e["name"], str) and e["dtype"] in DTYPE_NAMES.values()
              and all(isinstance(v, list) and v and all(type(s) is int and s >= 0 for s in v)
                      for v in (e["shape"], e["view"]))
              and type(e["dim"]) is int and 0 <= e["dim"] < len(e["view"])
              and math.prod(e["shape"]) == math.prod(e["view"]))
        if not ok:
            raise FormatError(f"{path}: entry {i} of metadata 'compressed' is malformed: {e!r} (needs name, shape, "
                              f"dtype, view and dim, with prod(view) == prod(shape) and 0 <= dim < len(view))",
        path=path)
        if e["name"] in seen:
            raise FormatError(f"{path}: tensor {e['name']!r} is listed twice in metadata 'compressed'", path=path)
        seen.add(e["name"])
    return {"n": n, "m": m, "layout": layout, "version": version, "compressed": listed,
            "dense_layers": dense_layers, "nmsparse_version": meta.get("nmsparse_version")}


def load_compressed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save_compressed` into ``model`` (same architecture, dtypes).

    The file's checksum (:mod:`nmsparse.plumbing.checksum`) is verified tensor by tensor as it is read (a file
    written without one loads with an :class:`~nmsparse.plumbing.checksum.UnverifiedFileWarning`). Every name,
    shape, dtype, the metadata and every stored position are checked, and every compressed weight
    is decompressed, *before* the model is touched: any mismatch or corruption
    raises :class:`FormatError` (a ``ValueError``) naming the tensor and what differs, and ``model``
    is unchanged. Returns ``model``."""
    from safetensors import safe_open

    if not isinstance(model, nn.Module):
        raise ValueError(f"load_compressed needs an nn.Module, got {type(model).__name__}")
    if not Path(path).is_file():
        raise FormatError(f"{path} is not a file", path=path)
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            raise ValueError(f"layer {name!r} of the model has parametrizations (N:M training machinery); load into "
                             "a plain model of the same architecture, or call nmsparse.finalize(model) first")
    state = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    rec = None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rec = _record(meta, path)  # checked first: a damaged file is named as such, not as a misfit
            if rec is not None:
                _verified(lambda: (rec.check_metadata(meta), rec.check_names(f.keys())), path)
            header = _parse_meta(meta, path)
            keys = set(f.keys())
            _check_names(header, keys, state, path)
            layers = _layer_weights(model, header["layout"])
            listed = {e["name"]: e for e in header["compressed"]}
            read = _reader(f, rec, path)
            for key, target in state.items():
                if key in listed:
                    new[key] = _load_one(read, listed[key], target, layers.get(key), header, path)
                else:
                    t = read(key)
                    _check_like(key, t, target, path)
                    new[key] = t
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors on truncated or lying files
        raise FormatError(f"{path} is not a valid nmsparse compressed file: {type(e).__name__}: {e}",
                          path=path) from None
    if rec is None:
        checksum.warn_unverified(path)
    with torch.no_grad():
        model.load_state_dict(new, strict=True)
    return model


def _reader(f, rec, path):
    """``name -> tensor`` of open file ``f``, each tensor checked against checksum record ``rec``."""

    def read(name: str) -> torch.Tensor:
        t = f.get_tensor(name)
        if rec is not None:
            _verified(lambda: rec.check(name, t), path)
        return t

    return read


def _check_names(header: dict, keys: set[str], state: dict, path) -> None:
    listed = {e["name"] for e in header["compressed"]}
    for name in sorted(listed):
        if name not in state:
            raise FormatError(f"{path}: compressed tensor {name!r} is not in the model", path=path)
    expected = set()
    for key in state:
        expected |= {key + VALUES, key + INDEX} if key in listed else {key}
    for key in sorted(expected):
        if key not in keys:
            raise FormatError(f"{path}: tensor {key!r} of the model is missing from the file", path=path)
    for key in sorted(keys - expected):
        raise FormatError(f"{path}: the file holds tensor {key!r}, which is not in the model", path=path)


def _check_like(key: str, t: torch.Tensor, target: torch.Tensor, path) -> None:
    if t.dtype != target.dtype:
        raise FormatError(f"{path}: tensor {key!r} has dtype {t.dtype} in the file but {target.dtype} in the model "
                          "(convert the model first, e.g. model.half())", path=path)
    if t.shape != target.shape:
        raise FormatError(f"{path}: tensor {key!r} has shape {tuple(t.shape)} in the file but "
                          f"{tuple(target.shape)} in the model", path=path)


def _load_one(read, e: dict, target: torch.Tensor, axis, header: dict, path) -> torch.Tensor:
    key, n, m = e["name"], header["n"], header["m"]
    if axis is None:
        raise FormatError(f"{path}: {key!r} is stored compressed but is not the weight of a Linear, Conv or Conv1D "
                          "layer of the model", path=path)
    if DTYPE_NAMES.get(target.dtype) != e["dtype"] or tuple(e["shape"]) != tuple(target.shape):
        raise FormatError(f"{path}: tensor {key!r} is {e['dtype']} {tuple(e['shape'])} in the file but "
                          f"{str(target.dtype).replace('torch.', '')} {tuple(target.shape)} in the model", path=path)
    if (tuple(e["view"]), e["dim"]) != (tuple(axis[0]), axis[1]):
        raise FormatError(f"{path}: tensor {key!r} is grouped as view {tuple(e['view'])} dim {e['dim']} in the file, "
                          f"but the model's layer groups it as view {tuple(axis[0])} dim {axis[1]} "
                          f"(layout {header['layout']!r})", path=path)
    values, index = read(key + VALUES), read(key + INDEX)
    want = values_shape(tuple(e["view"]), e["dim"], n, m)
    if values.dtype != target.dtype or tuple(values.shape) != want:
        raise FormatError(f"{path}: {key + VALUES!r} is {values.dtype} {tuple(values.shape)}, expected "
                          f"{target.dtype} {want}", path=path)
    c = NMCompressed(values, index, n, m, e["dim"], tuple(e["view"]), target.dtype)
    try:
        dense = decompress(c)
    except ValueError as err:
        raise FormatError(f"{path}: compressed tensor {key!r}: {err}", path=path) from None
    return dense.reshape(target.shape)
