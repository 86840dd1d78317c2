"""Calibration: what one-shot pruning and permutation searches learn from a model's inputs.

* :mod:`~nmsparse.calibration.geometry`: one layer's weight as matrices and its inputs as rows (im2col).
* :mod:`~nmsparse.calibration.collect`: forward order, per-layer input statistics (Gram matrices).
* :mod:`~nmsparse.calibration.gram`: the statistics themselves (``X^T X``, or feature norms and a row sample).
* :mod:`~nmsparse.calibration.sequential`: repeated blocks run one by one from their cached inputs.
* :mod:`~nmsparse.calibration.streaming`, :mod:`~nmsparse.calibration.spill`: a ``transformers`` model
  run block by block with the rest of it on disk, hidden states spilled to disk.
"""
