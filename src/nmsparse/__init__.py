"""nmsparse: N:M fine-grained structured sparsity for PyTorch.

N always means the number of weights **kept** in every group of M consecutive weights along a
layer's reduction dimension (2:4 keeps 2 of every 4).
"""

from nmsparse.diversity import diversity_log10, mask_diversity, transposable_count
from nmsparse.layout import layer_is_nm, layer_mask
from nmsparse.nmmasks import is_nm, nm_mask
from nmsparse.permute import PermuteReport, permute_channels
from nmsparse.prune import PruneReport, prune
from nmsparse.sad import SADRecord, SADTracker, sad
from nmsparse.selection import LayerEntry, SparsityReport, plan
from nmsparse.sparsify import finalize, magnitude_masks, masks, sparse_layers, sparsify
from nmsparse.transposable import (
    is_transposable_nm,
    layer_is_transposable_nm,
    transposable_layer_mask,
    transposable_mask,
)

__version__ = "0.1.0"

__all__ = [
    "LayerEntry",
    "SADRecord",
    "SADTracker",
    "SparsityReport",
    "diversity_log10",
    "finalize",
    "is_nm",
    "is_transposable_nm",
    "layer_is_nm",
    "layer_is_transposable_nm",
    "layer_mask",
    "magnitude_masks",
    "mask_diversity",
    "masks",
    "nm_mask",
    "permute_channels",
    "PermuteReport",
    "plan",
    "prune",
    "PruneReport",
    "sad",
    "sparse_layers",
    "sparsify",
    "transposable_count",
    "transposable_layer_mask",
    "transposable_mask",
]
