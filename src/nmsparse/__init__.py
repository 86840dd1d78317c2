"""nmsparse: N:M fine-grained structured sparsity for PyTorch.

N always means the number of weights **kept** in every group of M consecutive weights along a
layer's reduction dimension (2:4 keeps 2 of every 4).

This module only re-exports the public API (and keeps the module paths of releases before the layered
layout importable for one release, with a ``DeprecationWarning``: :mod:`nmsparse._compat`). The code
lives in one subpackage per layer, bottom up: ``plumbing`` -> ``masking`` -> ``surgery``,
``calibration``, ``permute``, ``pruning``, ``lora`` -> ``kernels``, ``export``, ``integrations`` ->
``training``, ``distillation``, ``reproduce``, ``inspection``, ``cli`` (see CONTRIBUTING.md).
"""

from nmsparse import _compat
from nmsparse.plumbing.errors import LoadError, WriteError
from nmsparse.plumbing.version import __version__
from nmsparse.masking.diversity import diversity_log10, mask_diversity, transposable_count
from nmsparse.masking.divergence import sad
from nmsparse.masking.layout import layer_is_nm, layer_mask
from nmsparse.masking.nm import is_nm, nm_mask
from nmsparse.masking.pattern import NMPattern
from nmsparse.masking.transposable import (
    is_transposable_nm,
    layer_is_transposable_nm,
    transposable_layer_mask,
    transposable_mask,
)
from nmsparse.surgery.sad_tracker import SADRecord, SADTracker
from nmsparse.surgery.selection import LayerEntry, SparsityReport, plan
from nmsparse.surgery.sparse_model import finalize, magnitude_masks, masks, sparse_layers, sparse_tensors, sparsify
from nmsparse.permute import PermuteReport, permute_channels
from nmsparse.pruning import AdaPrune, BlockReconstruct, Magnitude, PruneReport, SparseGPT, Wanda, prune
from nmsparse.kernels import NMLinear, NMLinearReport, semi_structured_plan, to_nm_linear, to_semi_structured
from nmsparse.export import NMCompressed, compress, decompress, load_compressed, save_compressed
from nmsparse.distillation import DistillReport, distill
from nmsparse.inspection import InspectReport, inspect

_compat.install(__name__)

__all__ = [
    "__version__",
    "AdaPrune",
    "BlockReconstruct",
    "Magnitude",
    "SparseGPT",
    "Wanda",
    "NMCompressed",
    "compress",
    "decompress",
    "load_compressed",
    "save_compressed",
    "LayerEntry",
    "LoadError",
    "WriteError",
    "SADRecord",
    "SADTracker",
    "SparsityReport",
    "distill",
    "DistillReport",
    "diversity_log10",
    "InspectReport",
    "inspect",
    "finalize",
    "is_nm",
    "is_transposable_nm",
    "layer_is_nm",
    "layer_is_transposable_nm",
    "layer_mask",
    "magnitude_masks",
    "mask_diversity",
    "NMLinear",
    "NMPattern",
    "NMLinearReport",
    "masks",
    "nm_mask",
    "permute_channels",
    "PermuteReport",
    "plan",
    "prune",
    "PruneReport",
    "sad",
    "semi_structured_plan",
    "sparse_layers",
    "sparse_tensors",
    "sparsify",
    "to_nm_linear",
    "to_semi_structured",
    "transposable_count",
    "transposable_layer_mask",
    "transposable_mask",
]
