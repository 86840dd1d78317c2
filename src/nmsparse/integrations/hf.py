"""Hugging Face ``transformers``: sparsified models that save, load and resume like any other.

A model made N:M by :func:`nmsparse.sparsify` keeps its dense weight ``W`` as the trained parameter
(``<layer>.parametrizations.weight.original``) and its keep-mask and mask-step counter as buffers, so
its ``state_dict`` has keys a fresh ``transformers`` model does not know. This module makes that
round trip work:

* :func:`sparsify` is :func:`nmsparse.sparsify` that also records the sparsity settings in
  ``model.config.nmsparse`` (:func:`record` does it for a model sparsified already), so that
  ``model.save_pretrained(path)`` writes them into ``config.json`` next to the weights.
* :func:`from_pretrained` rebuilds ``ModelClass`` from ``path``, sparsifies it with the recorded
  settings and loads the dense weights, masks and counters strictly: the model comes back sparsified
  exactly as it was saved (same outputs, same masks, training resumes where it stopped).
* :class:`NMSparseCallback` records the settings at the start of ``Trainer.train`` so that every
  checkpoint Trainer writes carries them. Trainer's own ``resume_from_checkpoint`` then works
  unchanged (the model it resumes into is the sparsified one, whose keys match the checkpoint).

To ship a *deployable* model, ``nmsparse.finalize`` a copy and ``save_pretrained`` that: plain
weights holding the zeros, which any ``from_pretrained`` loads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from torch import nn

from nmsparse.masking.layout import _transposed, layer_mask
from nmsparse.calibration.streaming import CheckpointReader, build_model
from nmsparse.surgery.selection import SparsityReport, literal_pattern, tied_aliases
from nmsparse.surgery.sparse_model import sparse_layers
from nmsparse.surgery.sparse_model import sparsify as _sparsify
from nmsparse.masking.transposable import transposable_layer_mask

CONFIG_KEY = "nmsparse"
SETTINGS_VERSION = 1
_ORIGINAL = ".parametrizations.weight.original"


def settings_of(model: nn.Module) -> dict[str, Any]:
    """The sparsity settings of a sparsified model, as :func:`record` stores them: ``n``, ``m``
    (N kept per group of M), ``layout``, ``method``, ``decay``, ``update_every``, ``transposable``,
    ``mask_method``, ``shared`` (``"sparsify"`` when a tied weight was made N:M for all its users,
    else ``"dense"``) and ``layers`` (module names of the sparse layers, in order).

    Raises ``ValueError`` when the model has no N:M layer, when its layers were sparsified with
    different settings, or when a layer uses a custom ``mask_fn`` (which cannot be recorded)."""
    found = list(sparse_layers(model))
    if not found:
        raise ValueError("the model has no N:M sparse layer: call nmsparse.sparsify (or hf.sparsify) first")
    common: dict[str, Any] | None = None
    for name, _, p in found:
        s = dict(n=p.n, m=p.m, layout=p.layout, method=p.method, decay=p.decay, update_every=p.update_every,
                 transposable=bool(p.transposable), mask_method=_mask_method(name, p))
        if common is None:
            common = s
        elif s != common:
            diff = {k: (common[k], s[k]) for k in s if s[k] != common[k]}
            raise ValueError(f"layer {name} was sparsified with other settings than the first sparse layer "
                             f"({diff}); hf.record stores one set of settings per model")
    assert common is not None
    shared = "sparsify" if any(getattr(p, "shared", False) for _, _, p in found) else "dense"
    layers = list(dict.fromkeys(name for name, _, _ in found))
    return dict(version=SETTINGS_VERSION, **common, shared=shared, layers=layers)


def _mask_method(name: str, p: nn.Module) -> str | None:
    fn = p.mask_fn
    if isinstance(fn, functools.partial) and fn.func is _transposed:  # a Conv1D's (in, out) storage
        fn = fn.keywords["fn"]
    if isinstance(fn, functools.partial) and fn.func is layer_mask:
        return None
    if isinstance(fn, functools.partial) and fn.func is transposable_layer_mask:
        return fn.keywords.get("method", "approx")
    raise ValueError(f"layer {name} uses a custom mask_fn, which cannot be saved in a config: "
                     "sparsify it with the built-in mask rules to save it with save_pretrained")


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"{type(model).__name__} has no transformers config (model.config); hf.record is for "
                         "transformers models: save other models with nmsparse's own checkpoints")
    return config


def record(model: nn.Module) -> dict[str, Any]:
    """Write the model's sparsity settings (:func:`settings_of`) into ``model.config.nmsparse`` so that
    ``save_pretrained`` stores them in ``config.json``. Returns them."""
    config = _config_of(model)
    settings = settings_of(model)
    setattr(config, CONFIG_KEY, settings)
    _declare_tied(model)
    return settings


def _declare_tied(model: nn.Module) -> None:
    """Tell transformers which names of a tied weight are aliases: a tied weight made N:M
    (``shared="sparsify"``) appears as ``<module>.parametrizations.weight.original`` under every
    module that uses it, names transformers' own tied-weight table does not list, and
    ``save_pretrained`` refuses shared tensors it cannot account for."""
    extra = {alias: first for alias, first in tied_aliases(model).items() if ".parametrizations." in alias}
    if extra:  # an instance attribute: the class's table is shared by every model of the class
        model._tied_weights_keys = {**(getattr(model, "_tied_weights_keys", None) or {}), **extra}


def sparsify(model: nn.Module, n: int = 2, m: int = 4, **kwargs: Any) -> SparsityReport:
    """:func:`nmsparse.sparsify` for a ``transformers`` model, then :func:`record` (same arguments,
    except ``mask_fn``). Returns the report."""
    if kwargs.get("mask_fn") is not None:
        raise ValueError("hf.sparsify records its settings in the model config: a custom mask_fn cannot be "
                         "recorded; use nmsparse.sparsify for it")
    _config_of(model)  # fail before touching the model
    report = _sparsify(model, n, m, **kwargs)
    if report.sparse:
        record(model)
    return report


def from_pretrained(model_class: Any, path: str | os.PathLike, **config_kwargs: Any) -> nn.Module:
    """Load a sparsified model saved with ``save_pretrained``: ``model_class`` (e.g.
    ``BertForSequenceClassification``, or an ``AutoModel...`` class) built from the config in
    ``path``, sparsified with the settings recorded in it, with its dense weights, masks and mask
    counters loaded strictly from ``path`` (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``). ``config_kwargs`` go to the config (e.g. ``dtype``).

    Raises ``ValueError`` naming the problem when ``path`` holds no recorded settings (a model saved
    dense or finalized: load it with ``model_class.from_pretrained``), when a weight file is missing,
    or when the weights do not match the sparsified model (missing, unexpected or misshapen tensors).
    The returned model is in eval mode, like ``from_pretrained``'s."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a save_pretrained folder")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, **config_kwargs)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}/config.json records no nmsparse settings (no '{CONFIG_KEY}' entry): it was saved "
                         "dense or finalized, so load it with from_pretrained of its class; a sparsified model "
                         "records them through nmsparse.integrations.hf.sparsify / record / NMSparseCallback")
    kw = _sparsify_kwargs(settings, path)
    reader = CheckpointReader(path)  # safetensors or a sharded index; unreadable -> ValueError
    model = build_model(model_class, config)
    _sparsify(model, **kw)
    _load_strict(model, reader, path)
    model.eval()
    return model


def _sparsify_kwargs(s: dict, path: Path) -> dict[str, Any]:
    need = ("n", "m", "layout", "method", "decay", "update_every", "transposable", "layers")
    missing = [k for k in need if k not in s]
    if missing or s.get("version") != SETTINGS_VERSION:
        raise ValueError(f"{path}/config.json has nmsparse settings this version cannot read "
                         f"(version {s.get('version')!r}, missing {missing})")
    layers = s["layers"]
    if not layers or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"{path}/config.json: nmsparse 'layers' must be a non-empty list of module names")
    kw = dict(n=s["n"], m=s["m"], layout=s["layout"], method=s["method"], decay=s["decay"],
              update_every=s["update_every"], include=[literal_pattern(x) for x in layers], keep_dense=(),
              shared=s.get("shared", "dense"))
    if s["transposable"]:
        kw.update(transposable=True, mask_method=s.get("mask_method") or "approx")
    return kw


def _load_strict(model: nn.Module, reader: CheckpointReader, path: Path) -> None:
    own = model.state_dict()  # tensors sharing the model's storage: filled in place
    saved = set(reader.keys())
    unexpected = sorted(saved - set(own))
    missing = sorted(set(own) - saved)
    # save_pretrained leaves out the second name of a tied parameter: those may be missing
    tied = tied_aliases(model)
    missing = [k for k in missing if not (k in tied and tied[k] in saved)]
    if unexpected or missing:
        raise ValueError(f"the weights in {path} do not match {type(model).__name__} sparsified as recorded: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    reader.copy_into({k: own[k] for k in saved})  # shapes checked; the fresh model is tied already


def _callback_class():
    from transformers import TrainerCallback

    class NMSparseCallback(TrainerCallback):
        """Records the model's N:M settings in its config when training begins, so that every
        checkpoint ``Trainer`` writes (``config.json``) can be loaded with :func:`from_pretrained`
        and resumed with ``Trainer.train(resume_from_checkpoint=...)``."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                record(model)
            return control

    return NMSparseCallback


def __getattr__(name: str):
    if name == "NMSparseCallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
