"""compressed-tensors' ``sparse-24-bitmask`` folders: read (bf16/fp16, FP8 weights) and write.

* :func:`load`: a folder written by compressed-tensors (<= 0.14) or by :func:`save` -> ``transformers``
  model with dense-with-zeros 2:4 weights.
* :func:`save`: a finalized nmsparse 2:4 ``transformers`` model -> a folder that vLLM (<= 0.18) and
  compressed-tensors (<= 0.14) load.

See docs/interop.md.
"""

from nmsparse.integrations.compressed_tensors.read import load
from nmsparse.integrations.compressed_tensors.write import SaveReport, save

__all__ = ["SaveReport", "load", "save"]
