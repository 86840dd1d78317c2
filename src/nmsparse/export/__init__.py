"""Deployment: compressed N:M tensors and files, ONNX for TensorRT, and ``nmsparse export``.

* :mod:`nmsparse.export.compress`: :func:`compress` / :func:`decompress` (pure tensor functions).
* :mod:`nmsparse.export.files`: :func:`save_compressed` / :func:`load_compressed` (one safetensors file).
* :mod:`nmsparse.export.onnx`: :func:`export_onnx` (``torch.onnx.export``, N:M checked along the axis
  TensorRT reads, run in onnxruntime; ``onnx``/``onnxruntime`` are imported only when it runs).
"""

from nmsparse.export.compress import NMCompressed, compress, decompress
from nmsparse.export.files import FormatError, detect_nm, group_axis, load_compressed, read_header, save_compressed
from nmsparse.export.onnx import OnnxReport, export_onnx
from nmsparse.export.report import ExportReport, TensorEntry

__all__ = ["ExportReport", "FormatError", "NMCompressed", "OnnxReport", "TensorEntry", "compress", "decompress",
           "detect_nm", "export_onnx", "group_axis", "load_compressed", "read_header", "save_compressed"]
