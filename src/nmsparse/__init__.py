"""nmsparse: N:M fine-grained structured sparsity for PyTorch.

N always means the number of weights **kept** in every group of M consecutive weights along a
layer's reduction dimension (2:4 keeps 2 of every 4).
"""

from nmsparse.distill import DistillReport, distill
from nmsparse.diversity import diversity_log10, mask_diversity, transposable_count
from nmsparse.errors import LoadError, WriteError
from nmsparse.kernels import NMLinear, NMLinearReport, to_nm_linear
from nmsparse.layout import layer_is_nm, layer_mask
from nmsparse.nmmasks import is_nm, nm_mask
from nmsparse.permute import PermuteReport, permute_channels
from nmsparse.prune import AdaPrune, BlockReconstruct, Magnitude, PruneReport, SparseGPT, Wanda, prune
from nmsparse.sad import SADRecord, SADTracker, sad
from nmsparse.selection import LayerEntry, SparsityReport, plan
from nmsparse.semi import semi_structured_plan, to_semi_structured
from nmsparse.sparsify import finalize, magnitude_masks, masks, sparse_layers, sparse_tensors, sparsify
from nmsparse.transposable import (
    is_transposable_nm,
    layer_is_transposable_nm,
    transposable_layer_mask,
    transposable_mask,
)
from nmsparse.export import NMCompressed, compress, decompress, load_compressed, save_compressed
from nmsparse.inspect import InspectReport, inspect  # noqa: E402 - rebinds nmsparse.inspect to the function

__version__ = "0.1.0"

__all__ = [
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
