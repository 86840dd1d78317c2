"""Convert a trained model to N:M (N weights kept in every group of M) in one shot.

:func:`prune` prunes a model in place, layer by layer in forward order, with each layer's calibration
inputs taken from the already-pruned model (see :mod:`nmsparse.calibration.collect`). Methods:

* ``"magnitude"``: keep the N largest ``|w|`` of every group (NVIDIA ASP's one-shot step).
* ``"wanda"``: keep the N largest ``|w| * ||x||`` (Sun et al., 2023); no weight update.
* ``"sparsegpt"``: OBS-based pruning with weight update (Frantar and Alistarh, 2023).
* ``"adaprune"``: magnitude mask, then refit the kept weights and bias to the dense layer's outputs
  (Hubara et al., 2021), by ``solver="exact"`` (ridge least squares per row) or ``solver="adam"``
  (the paper's Adam).

Fine-tune recipe afterwards: ``nmsparse.sparsify(model, n, m, method="fixed")`` freezes the pruned
model's masks (every surviving weight is kept) and training updates only the kept weights.

Modules: :mod:`~nmsparse.pruning.api` (:func:`prune`, its argument checks), :mod:`~nmsparse.pruning.loop`
(calibrating and pruning the layers group by group, whole-model or block by block),
:mod:`~nmsparse.pruning.layer` (one layer, by method), :mod:`~nmsparse.pruning.report` (what ``prune``
returns), :mod:`~nmsparse.pruning.batchnorm` (:func:`recalibrate_batchnorm`), :mod:`~nmsparse.pruning.options`
(each method's options), one module per method's algorithm, and :mod:`~nmsparse.pruning.blockwise` (a
``transformers`` folder pruned block by block from disk).
"""

from __future__ import annotations

from nmsparse.pruning.adaprune import adam_solve, exact_solve
from nmsparse.calibration.geometry import im2col
from nmsparse.pruning.api import prune
from nmsparse.pruning.batchnorm import recalibrate_batchnorm
from nmsparse.pruning.loop import NEEDS_CALIB
from nmsparse.pruning.options import (METHODS, SOLVERS, UNSET, AdaPrune, BlockReconstruct, Magnitude, MethodOptions,
                                      SparseGPT, Wanda)
from nmsparse.pruning.report import LayerResult, PruneReport

__all__ = [
    "AdaPrune",
    "BlockReconstruct",
    "Magnitude",
    "MethodOptions",
    "SparseGPT",
    "Wanda",
    "METHODS",
    "NEEDS_CALIB",
    "SOLVERS",
    "UNSET",
    "LayerResult",
    "PruneReport",
    "adam_solve",
    "exact_solve",
    "im2col",
    "prune",
    "recalibrate_batchnorm",
]
