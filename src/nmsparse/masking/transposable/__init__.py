"""Transposable N:M masks (Hubara et al., NeurIPS 2021).

A weight ``W`` of shape ``(out, in)`` with an N:M mask along ``in`` speeds up the forward matmul; the
backward matmul that sends the error to the layer's input uses ``W^T``, which is N:M along ``out`` only
when the mask is *transposable*: in every aligned ``m x m`` tile ``W[i:i+m, j:j+m]`` every row and every
column keeps exactly ``n`` entries (N = weights **kept** per group of M, as everywhere in nmsparse).

Tiles are true aligned 2-D blocks of the ``(out, in)`` matrix. (The authors' code reshapes ``m*m``
consecutive weights of one output row into a square instead, which does not constrain ``W^T`` at all.)

Two methods; both return exactly ``n`` kept entries in every row and every column of every tile.

``"optimal"``
    The largest possible kept ``sum |w|`` per tile: the min-cost flow of the paper (rows -> columns,
    capacities ``n``, edge costs ``-|w|``), solved exactly by successive shortest paths:

    1. Start from the row-wise top-``n`` mask (ties broken in the rotated column order
       ``i, i+1, ..., i-1`` of row ``i``, so a constant tile is already balanced). It is optimal when only
       the rows are constrained, so its residual graph has no negative cycle.
    2. Move the surplus of over-full columns to under-full ones, one unit at a time, along shortest
       residual paths. A residual path alternates ``column j -> row i`` (drop kept ``(i, j)``) and
       ``row i -> column k`` (keep ``(i, k)``); the solver runs Dijkstra on the ``m`` columns with these
       two-step edges, of cost ``|w_ij| - |w_ik|``, made non-negative by column potentials. Only the
       surplus moves: about 1.5 (2:4), 4.3 (4:8) and 12.7 (8:16) augmentations per random tile.

    The kept total equals the linear-programming optimum up to float64 rounding of the path lengths
    (exactly, when the sums are exact, e.g. small integers). Ties between optimal masks are broken by
    the deterministic order of the steps above.
``"approx"``
    The paper's 2-approximation: per tile, visit entries by decreasing ``|w|`` (ties to the lower
    row-major index) and keep one while its row and its column hold fewer than ``n``. The greedy can
    strand rows below ``n`` (16% of random 4x4 tiles at 2:4, 55% of 8x8 at 4:8); those tiles are completed
    by augmenting paths (the shortest alternating paths from a short row to a short column, of largest
    kept-``|w|`` gain). A completed tile is accepted with a certificate of the 1/2 bound: it keeps at
    least what the greedy kept (the greedy keeps at least half of the best mask with at most ``n`` per
    row and column, the classic bound of greedy matching, hence of the optimum), or at least half of an
    upper bound on the optimum (the smaller of the row-wise and column-wise top-``n`` sums); otherwise
    the tile is solved exactly (this never happened on random matrices). So every row and column keeps
    exactly ``n``, and every tile keeps at least half of its optimum.

Magnitudes are compared and summed in float64. ``NaN`` and ``inf`` count as larger than every finite
magnitude (as in :func:`nmsparse.nm_mask`): in a tile holding any, they are given the value
``2*m*m*(F+1)`` with ``F`` the tile's largest finite ``|w|``, so as many of them as possible are kept.

CPU tensors run in compiled numba kernels (parallel over tiles); other devices (CUDA) run a vectorised
torch version of the same algorithms, with the same float operations in the same order and the same
tie-breaking, so both give identical masks. Exception: ``"optimal"`` 2:4 on CUDA scores each tile's 90
transposable patterns in one batched matmul (:mod:`.optimal24`): the same optimum, no host round
trip; on exact ties between optimal masks it may pick another one than the CPU.

The modules of this package:

* :mod:`.api`: the public functions, their input checks and the choice of path (and the test switches
  ``_FORCE_TORCH``, ``_AS_CUDA``: set them on ``api``);
* :mod:`.kernels`: the numba kernels (CPU);
* :mod:`.torch_path`: the vectorised torch path (CUDA, or no numba; ``_FIXED_ROUNDS_MAX`` lives there);
* :mod:`.optimal24`: exact 2:4 by enumerating the 90 transposable 4x4 patterns (CUDA).
"""

from nmsparse.masking.transposable.api import (
    METHODS,
    _masks,
    check_method,
    is_transposable_nm,
    layer_is_transposable_nm,
    transposable_layer_mask,
    transposable_mask,
    transposable_stats,
)
from nmsparse.masking.transposable.optimal24 import _optimal_24
from nmsparse.masking.transposable.torch_path import (
    _greedy_torch,
    _repair_torch,
    _solve_torch,
    _tiles_of,
    _torch_masks,
    _untile,
)

__all__ = [
    "METHODS",
    "check_method",
    "is_transposable_nm",
    "layer_is_transposable_nm",
    "transposable_layer_mask",
    "transposable_mask",
    "transposable_stats",
]
# internals that tests and benchmarks read through this package (to flip a switch, set it on the
# module that holds it: ``api._FORCE_TORCH``, ``api._AS_CUDA``, ``torch_path._FIXED_ROUNDS_MAX``)
__all__ += [
    "_greedy_torch", "_masks", "_optimal_24", "_repair_torch", "_solve_torch", "_tiles_of", "_torch_masks", "_untile",
]
