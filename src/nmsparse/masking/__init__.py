"""The mask layer: pure tensor functions on weights and masks (no modules are changed here).

N is the number of weights **kept** in every group of M consecutive weights along the reduction axis.

* :mod:`~nmsparse.masking.pattern`: :class:`NMPattern`, an N:M pattern checked once where it enters.
* :mod:`~nmsparse.masking.nm`: :func:`nm_mask`, :func:`is_nm` (numba ranking kernels in
  :mod:`~nmsparse.masking.rank_kernels`).
* :mod:`~nmsparse.masking.transposable`: masks N:M along both axes (optimal and fast solvers).
* :mod:`~nmsparse.masking.layout`: a layer's reduction axis and the groups of its weight.
* :mod:`~nmsparse.masking.diversity`: mask diversity (Hubara et al., 2021).
* :mod:`~nmsparse.masking.divergence`: SAD between two masks (Zhou et al., 2021).
"""

from nmsparse.masking.diversity import diversity_log10, mask_diversity, transposable_count
from nmsparse.masking.layout import layer_is_nm, layer_mask
from nmsparse.masking.nm import is_nm, nm_mask
from nmsparse.masking.pattern import NMPattern
from nmsparse.masking.divergence import sad
from nmsparse.masking.transposable import (
    is_transposable_nm,
    layer_is_transposable_nm,
    transposable_layer_mask,
    transposable_mask,
)

__all__ = ["NMPattern", "diversity_log10", "is_nm", "is_transposable_nm", "layer_is_nm", "layer_is_transposable_nm",
           "layer_mask", "mask_diversity", "nm_mask", "sad", "transposable_count", "transposable_layer_mask",
           "transposable_mask"]
