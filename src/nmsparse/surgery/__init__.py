"""Module surgery: which tensors of a model become N:M, and making them so for training.

* :mod:`~nmsparse.surgery.selection`: :func:`plan` (which layers, which stay dense and why).
* :mod:`~nmsparse.surgery.parametrization`: the N:M parametrization (STE, SR-STE, fixed masks).
* :mod:`~nmsparse.surgery.sparse_model`: :func:`sparsify`, :func:`finalize`, :func:`masks`.
* :mod:`~nmsparse.surgery.backends`: how a sparsified layer computes (dense, or a registered kernel back end).
* :mod:`~nmsparse.surgery.sad_tracker`: :class:`SADTracker` (SAD over training).
"""

from nmsparse.surgery.sad_tracker import SADRecord, SADTracker
from nmsparse.surgery.selection import LayerEntry, SparsityReport, plan
from nmsparse.surgery.sparse_model import finalize, magnitude_masks, masks, sparse_layers, sparse_tensors, sparsify

__all__ = ["LayerEntry", "SADRecord", "SADTracker", "SparsityReport", "finalize", "magnitude_masks", "masks", "plan",
           "sparse_layers", "sparse_tensors", "sparsify"]
