"""Deployment: compressed N:M tensors and files, and ``nmsparse export``.

* :mod:`nmsparse.export.compress`: :func:`compress` / :func:`decompress` (pure tensor functions).
* :mod:`nmsparse.export.files`: :func:`save_compressed` / :func:`load_compressed` (one safetensors file).
"""

# --- compressed tensors and files (branch i9-format) ---
from nmsparse.export.compress import NMCompressed, compress, decompress
from nmsparse.export.files import FormatError, detect_nm, group_axis, load_compressed, read_header, save_compressed
from nmsparse.export.report import ExportReport, TensorEntry

__all__ = ["ExportReport", "FormatError", "NMCompressed", "TensorEntry", "compress", "decompress", "detect_nm",
           "group_axis", "load_compressed", "read_header", "save_compressed"]
