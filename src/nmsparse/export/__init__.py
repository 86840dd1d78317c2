"""Deployment formats of finalized N:M models (minimal in this branch: the ONNX export only)."""

from nmsparse.export.onnx import OnnxReport, export_onnx

__all__ = ["OnnxReport", "export_onnx"]
