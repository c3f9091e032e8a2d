"""frcnn.runtime — run an exported detector (ONNX Runtime or TensorRT) without torch.

This package never imports torch. Heavy backends are imported lazily, on first use.
"""

from typing import Any

__all__ = ["Detections", "Detector"]


def __getattr__(name: str) -> Any:
    """``from frcnn.runtime import Detector`` without importing onnxruntime until it is used."""
    if name == "Detections":
        from frcnn.runtime.detections import Detections

        return Detections
    if name == "Detector":
        from frcnn.runtime.detector import Detector

        return Detector
    raise AttributeError(f"module 'frcnn.runtime' has no attribute {name!r}")
