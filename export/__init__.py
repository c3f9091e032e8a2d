"""frcnn.export: checkpoint -> ONNX (-> TensorRT engine), and the INT8 Q/DQ copy (``quantize_onnx``)."""

from __future__ import annotations

from typing import Any

__all__ = ["quantize_onnx"]


def __getattr__(name: str) -> Any:  # lazy: ``import frcnn.export`` stays cheap (no onnx / onnxruntime import)
    if name == "quantize_onnx":
        from frcnn.export.quantize import quantize_onnx

        return quantize_onnx
    raise AttributeError(f"module 'frcnn.export' has no attribute {name!r}")
