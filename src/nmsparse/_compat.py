"""Module paths of the releases before the layered layout, importable for one more release.

``import nmsparse.nmmasks`` (and every other path in :data:`MOVED`) still works: it gives the module at
its new place and warns once with a ``DeprecationWarning`` naming that place. The aliases are served
by a finder on ``sys.meta_path`` that only answers for the names below, so nothing else changes.

The facade's own functions (``nmsparse.prune``, ``nmsparse.sparsify``, ``nmsparse.sad``,
``nmsparse.inspect``, ``nmsparse.distill``) share their names with old modules; importing such an old
path must not replace the function on the package, so the facade's module type keeps its callables
when the import machinery sets a submodule of the same name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module (below nmsparse) -> new module
MOVED = {
    "errors": "plumbing.errors", "io": "plumbing.io", "writing": "plumbing.writing",
    "checksum": "plumbing.checksum", "progress": "plumbing.progress", "_numba_pool": "plumbing.numba_pool",
    "clihelp": "cli.help",
    "nmmasks": "masking.nm", "_kernels": "masking.rank_kernels", "transposable": "masking.transposable",
    "layout": "masking.layout", "diversity": "masking.diversity", "sad": "surgery.sad_tracker",
    "selection": "surgery.selection", "parametrization": "surgery.parametrization",
    "sparsify": "surgery.sparse_model", "backends": "surgery.backends", "semi": "kernels.semi_convert",
    "prune": "pruning", "prune.adaprune": "pruning.adaprune", "prune.blockwise": "pruning.blockwise",
    "prune.magnitude": "pruning.magnitude", "prune.options": "pruning.options",
    "prune.perplexity": "pruning.perplexity", "prune.reconstruct": "pruning.reconstruct",
    "prune.sparsegpt": "pruning.sparsegpt", "prune.wanda": "pruning.wanda",
    "prune.calibration": "calibration.collect", "prune.geometry": "calibration.geometry",
    "prune.sequential": "calibration.sequential", "prune.streaming": "calibration.streaming",
    "prune.spill": "calibration.spill", "prune.recipe": "training.recipe",
    "prune.cli": "cli.prune", "prune.hf_cli": "cli.prune_hf",
    "export.cli": "cli.export", "export.onnx_cli": "cli.export_onnx", "training.cli": "cli.train",
    "distill": "distillation", "distill.blocks": "distillation.blocks", "distill.loop": "distillation.loop",
    "distill.losses": "distillation.losses", "distill.state": "distillation.state", "distill.cli": "cli.distill",
    "inspect": "inspection", "inspect.api": "inspection.api", "inspect.patterns": "inspection.patterns",
    "inspect.report": "inspection.report", "inspect.sources": "inspection.sources", "inspect.cli": "cli.inspect",
    "reproduce.cli": "cli.reproduce",
}


def _new_name(old: str) -> str | None:
    """The new path of ``old`` (below the package): listed, or below a listed package (``prune.x`` ->
    ``pruning.x``); None for a path that did not move."""
    if old in MOVED:
        return MOVED[old]
    head, _, tail = old.rpartition(".")
    while head:
        if head in MOVED:
            return f"{MOVED[head]}.{tail}"
        head, _, rest = head.rpartition(".")
        tail = f"{rest}.{tail}"
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec):  # a placeholder; exec_module puts the real module in its place
        return None

    def exec_module(self, module) -> None:
        name = module.__name__
        warnings.warn(f"{name} moved to {self.new}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        sys.modules[name] = importlib.import_module(self.new)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str) -> None:
        self.prefix = package + "."

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        new = _new_name(fullname[len(self.prefix):])
        if new is None:
            return None
        new = self.prefix + new
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), is_package=True)


class _Facade(types.ModuleType):
    """The package's module type: a submodule import never replaces one of its functions."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and callable(self.__dict__.get(name)):
            return
        super().__setattr__(name, value)


def install(package: str) -> None:
    """Serve the old paths of ``package`` (called once, at the end of the facade's import)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        # first: below an old package path (nmsparse.prune), the path finder would otherwise load a
        # second copy of a module from the new package's folder
        sys.meta_path.insert(0, _AliasFinder(package))
    sys.modules[package].__class__ = _Facade
