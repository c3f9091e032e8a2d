"""frcnn.runtime — run an exported detector (ONNX Runtime or TensorRT) without torch.

This package never imports torch. Heavy backends are imported lazily, on first use.
"""
