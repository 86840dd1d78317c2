"""Module paths of the releases before the layered layout still import, for one release, with a warning."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import nmsparse
from nmsparse._compat import MOVED

SCRIPT = r"""
import importlib, json, sys, warnings
import nmsparse
from nmsparse._compat import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mod = importlib.import_module("nmsparse." + old)
    out[old] = [mod is importlib.import_module("nmsparse." + new), [str(x.message) for x in w
                if issubclass(x.category, DeprecationWarning)]]
from nmsparse.prune import SparseGPT
from nmsparse.prune.calibration import LayerCollector
out["facade"] = [callable(getattr(nmsparse, f)) for f in ("prune", "sparsify", "sad", "inspect", "distill")]
out["classes"] = [SparseGPT.__module__, LayerCollector.__module__]
print(json.dumps(out))
"""


def test_every_old_path_gives_the_new_module_with_one_deprecation_warning():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for old, new in MOVED.items():
        same, warned = out[old]
        assert same, old
        assert warned == [f"nmsparse.{old} moved to nmsparse.{new}; the old path will be removed in the next "
                          "release"], old
    # importing nmsparse.prune / .sparsify / .sad / .inspect / .distill (old modules) keeps the functions
    assert out["facade"] == [True] * 5
    assert out["classes"] == ["nmsparse.pruning.options", "nmsparse.calibration.collect"]


@pytest.mark.parametrize("new", sorted(set(MOVED.values())))
def test_every_new_path_exists(new):
    importlib.import_module("nmsparse." + new)


def test_the_facade_keeps_its_functions_when_a_module_of_that_name_is_set():
    import types

    nmsparse.prune = types.ModuleType("nmsparse.prune")  # what the import machinery does for an old path
    assert callable(nmsparse.prune)


def test_unknown_paths_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("nmsparse.no_such_module")
